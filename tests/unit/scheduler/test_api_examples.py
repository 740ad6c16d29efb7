"""Every job spec shipped under examples/ loads and passes the checks a submit runs
(with model.path swapped for a test model dir), and builds its prompts."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from rlfleet.common.errors import InvalidArgument
from rlfleet.common.tasks import PromptSource
from rlfleet.scheduler.core import validate_spec

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SPECS = sorted([*EXAMPLES.glob("*.toml"), *EXAMPLES.glob("*.json")])


def _load(path: Path) -> dict:
    return (
        json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
    )


def test_examples_are_shipped():
    names = {p.name for p in SPECS}
    assert {"basic_arithmetic.toml", "basic_arithmetic.json", "c3po_arithmetic.toml"} <= names
    verifiers = {_load(p).get("reward", {}).get("verifier", "reasoning_gym") for p in SPECS}
    assert {"reasoning_gym", "math", "regex"} <= verifiers


def _own_data(spec: dict, tmp_path: Path) -> None:
    """A dataset example's file, written by the script the example names, in tmp_path."""
    import importlib.util

    script = EXAMPLES / "make_gsm8k_style.py"
    module_spec = importlib.util.spec_from_file_location("make_gsm8k_style", script)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    data = spec["task"]["dataset"]
    assert data["path"] == "examples/data/gsm8k_style.jsonl"  # where the comment says
    data["path"] = str(module.write(tmp_path / "gsm8k_style.jsonl", rows=200))


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_example_validates(path, token_model_dir, tmp_path):
    spec = _load(path)
    assert spec["model"]["path"], "every example names a (placeholder) model path"
    spec["model"]["path"] = str(token_model_dir)
    if spec.get("task", {}).get("kind") == "dataset":
        _own_data(spec, tmp_path)
    try:
        parsed = validate_spec(json.dumps(spec))
    except InvalidArgument as exc:
        if "not implemented yet" in exc.message:  # a scheduling mode still being built
            pytest.skip(exc.message)
        raise
    prompt, entry = PromptSource(parsed.task).get(0)
    assert prompt and "answer" in entry
    if parsed.task.kind == "dataset":  # the ground truth is N, not the worked solution
        assert entry["answer"].lstrip("-").isdigit(), entry["answer"]


def test_json_example_is_the_toml_one():
    assert _load(EXAMPLES / "basic_arithmetic.json") == _load(EXAMPLES / "basic_arithmetic.toml")


def test_bad_task_params_fail_the_submit(token_model_dir):
    spec = _load(EXAMPLES / "basic_arithmetic.toml")
    spec["model"]["path"] = str(token_model_dir)
    spec["task"]["params"] = {"colour": "blue"}
    with pytest.raises(InvalidArgument, match="task.params .*colour"):
        validate_spec(json.dumps(spec))
    spec["task"]["params"] = {"min_digits": 5, "max_digits": 1}
    with pytest.raises(InvalidArgument, match="max_digits must be >= min_digits"):
        validate_spec(json.dumps(spec))
