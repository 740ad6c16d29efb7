"""The environment service: multi-turn episodes (tool calls in the sandbox, feedback
turns) that a rollout drives turn by turn over gRPC. See docs/ENVIRONMENTS.md."""
