"""Weight-sync service: receives policy versions in chunks, verifies, keeps and serves them,
and tracks which rollout replica holds which version.

Entry: ``python -m rlfleet.weightsync``. Logic: ``store.VersionStore`` (with
``spool.Spool`` on disk) and ``replicas.setup_replica_registry``.
"""
