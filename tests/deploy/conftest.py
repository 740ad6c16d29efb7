"""Fixtures of the deployment-artefact tests (the helpers live in deploy_helpers.py)."""

from deploy_helpers import docker_compose, promtool  # noqa: F401 - fixtures
