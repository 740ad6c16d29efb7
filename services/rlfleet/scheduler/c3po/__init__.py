"""C3PO++ (Ring-1T, arXiv 2510.18855): token-budget partitioned rollouts with carry-over.

One module per concern: ``pool`` (the inference pool P and its groups), ``driver``
(one iteration of the algorithm over any backend), ``grpc_backend`` (live replicas),
``sim`` (a discrete-event fleet with a virtual clock), ``store`` (P in Redis),
``metrics`` (step-record keys and Prometheus), ``strategy`` (the step loop's rollout
strategy). docs/C3PO.md describes the algorithm and the decisions the paper leaves open.
"""
