"""Every shipped values file loads against values.schema.json; every key of values.yaml is
documented with `# --` and listed in the chart's README; typos are refused.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from deploy_helpers import CHART, VALUES_FILES, _helm

SCHEMA = json.loads((CHART / "values.schema.json").read_text())


@pytest.mark.parametrize("path", VALUES_FILES, ids=lambda p: p.name)
def test_shipped_values_file_matches_the_schema(path):
    jsonschema = pytest.importorskip("jsonschema")
    values = yaml.safe_load(path.read_text()) or {}
    # As `helm install -f FILE` does: the file over the chart's defaults, then the schema.
    chart = _helm().Chart.load(str(CHART))
    merged = chart.merge_values(values)
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    errors = sorted(jsonschema.Draft7Validator(SCHEMA).iter_errors(merged), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    chart.validate_schema(merged)  # Helm's own validator agrees


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"rollout": {"replica": 3}}, "replica"),  # misspelt key
        ({"rollout": {"gpu": {"count": -1}}}, "count"),
        ({"scheduler": {"replicas": 2}}, "replicas"),  # one step loop per fleet
        ({"rollout": {"engine": "tensorrt"}}, "engine"),
        ({"redis": {"external": {"url": "http://redis:6379"}}}, "url"),
        ({"logFormat": "xml"}, "logFormat"),
        ({"weightsync": {"dataPort": 0}}, "dataPort"),  # a free port no Service can name
        ({"weightsync": {"dataPort": 70000}}, "dataPort"),
        ({"env": {"replica": 1}}, "replica"),  # the env service's keys are checked too
        ({"env": {"replicas": -1}}, "replicas"),
        ({"env": {"enabled": "yes"}}, "enabled"),
    ],
)
def test_schema_refuses_bad_values(bad, where):
    helm = _helm()
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmValuesError, match=where):
        chart.validate_schema(chart.merge_values(bad))


def test_env_service_defaults_to_one_pod_and_says_why():
    """The env service holds episodes in memory: one pod by default, and values.yaml says
    so where `env.replicas` is set (the chart refuses more, templates/validate.yaml)."""
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    assert values["env"]["enabled"] is True and values["env"]["replicas"] == 1
    assert values["env"]["pdb"]["enabled"] is False
    block = text.split("\nenv:\n", 1)[1].split("\n  replicas:", 1)[0]
    comment = " ".join(line.strip("# ") for line in block.splitlines()[-6:])
    assert "keep 1" in comment and "memory" in comment and "NOT_FOUND" in comment
    assert "env" in SCHEMA["required"]
    assert SCHEMA["properties"]["env"]["properties"].keys() == (
        SCHEMA["properties"]["reward"]["properties"].keys()
    )


def _undocumented_keys(text: str) -> list[str]:
    """Keys without a `# --` comment whose value is not a mapping of documented keys.

    A documented key covers everything beneath it (e.g. `resources`), as helm-docs reads it.
    """
    lines = text.splitlines()
    entries = []  # (indent, key, documented, line number)
    comment_block: list[str] = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            comment_block.append(stripped)
            continue
        if not stripped:
            comment_block = []
            continue
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(\s|$)", line)
        if match and not stripped.startswith("- "):
            documented = any(c.startswith("# --") for c in comment_block)
            entries.append((len(match.group(1)), match.group(2), documented, number))
        comment_block = []
    missing = []
    path: list[tuple[int, str, bool]] = []
    for i, (indent, key, documented, number) in enumerate(entries):
        while path and path[-1][0] >= indent:
            path.pop()
        covered = any(d for _, _, d in path)
        has_children = i + 1 < len(entries) and entries[i + 1][0] > indent
        if not covered and not documented and not has_children:
            missing.append(f"line {number}: {'.'.join([k for _, k, _ in path] + [key])}")
        path.append((indent, key, documented))
    return missing


def test_every_value_is_documented():
    missing = _undocumented_keys((CHART / "values.yaml").read_text())
    assert not missing, "values without a `# --` comment:\n" + "\n".join(missing)


def _documented_paths(text: str) -> list[str]:
    lines = text.splitlines()
    paths, stack, pending = [], [], False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = True
            continue
        if not stripped or stripped.startswith("#"):
            continue
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(\s|$)", line)
        if not match or stripped.startswith("- "):
            pending = False
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        if pending:
            paths.append(".".join(k for _, k in stack))
        pending = False
    return paths


def test_readme_lists_every_documented_value():
    readme = (CHART / "README.md").read_text()
    paths = _documented_paths((CHART / "values.yaml").read_text())
    assert len(paths) > 100
    missing = [p for p in paths if f"`{p}`" not in readme]
    assert not missing, "values missing from charts/rlfleet/README.md:\n" + "\n".join(missing)
