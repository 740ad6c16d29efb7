"""Weight-sync service: receives policy versions in chunks, verifies, keeps and serves them,
and tracks which rollout replica holds which version.

Entry: ``python -m rlfleet.weightsync``. Logic: ``store.VersionStore`` (versions in
mapped files of ``spool.Spool``, or in memory; their needs checked by
``budget.Budget``) and ``replicas.setup_replica_registry``.
"""
