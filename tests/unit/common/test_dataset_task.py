"""Prompts from the user's own data (``task.kind = "dataset"``): JSONL, Parquet, CSV and
``save_to_disk`` directories read with ``datasets``, column mapping, a seeded order that
survives restarts, held-out eval parts, and a clear error for each bad input."""

from __future__ import annotations

import json

import pytest
from rlfleet.common.errors import InvalidArgument
from rlfleet.common.jobspec import JobSpec, TaskSpec
from rlfleet.common.tasks import PromptSource
from rlfleet.scheduler.core import validate_spec

ROWS = [
    {"problem": f"What is {i} + {i}?", "solution": str(2 * i), "level": i % 3} for i in range(40)
]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def task(path, **dataset) -> TaskSpec:
    mapping = {"prompt_column": "problem", "answer_column": "solution"}
    return TaskSpec.model_validate(
        {"kind": "dataset", "seed": 3, "dataset": {"path": str(path), **mapping, **dataset}}
    )


def prompts_of(spec: TaskSpec) -> list[tuple[str, dict]]:
    source = PromptSource(spec)
    return [source.get(i) for i in range(len(source.dataset))]


def test_a_jsonl_file_gives_every_row_once_in_a_seeded_order_that_survives_a_restart(jsonl):
    first = prompts_of(task(jsonl))
    assert sorted(e["problem"] for _, e in first) == sorted(r["problem"] for r in ROWS)
    prompt, entry = first[0]
    assert prompt == f"{entry['problem']} Answer:"  # the job's prompt template
    # The mapped columns are the entry's question and answer; the others travel along.
    assert entry["question"] == entry["problem"] and entry["answer"] == entry["solution"]
    assert entry["level"] == int(entry["solution"]) // 2 % 3
    assert prompts_of(task(jsonl)) == first  # a restarted scheduler draws the same prompts
    assert [e["problem"] for _, e in first] != [r["problem"] for r in ROWS]  # shuffled
    other = prompts_of(TaskSpec.model_validate({**task(jsonl).model_dump(), "seed": 4}))
    assert [e["problem"] for _, e in other] != [e["problem"] for _, e in first]
    unshuffled = prompts_of(task(jsonl, shuffle=False))
    assert [e["problem"] for _, e in unshuffled] == [r["problem"] for r in ROWS]


def test_parquet_csv_and_saved_directories_read_the_same_rows(tmp_path, jsonl):
    import datasets

    data = datasets.Dataset.from_list(ROWS)
    data.to_parquet(str(tmp_path / "train.parquet"))
    data.to_csv(str(tmp_path / "train.csv"), index=False)
    datasets.DatasetDict({"train": data, "test": data.select(range(5))}).save_to_disk(
        str(tmp_path / "saved")
    )
    want = {e["problem"]: e["solution"] for _, e in prompts_of(task(jsonl))}
    for path in ("train.parquet", "train.csv", "saved"):
        got = prompts_of(task(tmp_path / path))
        assert {e["problem"]: str(e["solution"]) for _, e in got} == want, path
    # A saved DatasetDict names its eval split.
    from rlfleet.common.dataset_task import DatasetEntries

    spec = task(tmp_path / "saved", eval_split="test").dataset
    assert len(DatasetEntries(spec, seed=0, part="eval")) == 5


def test_a_held_out_fraction_is_disjoint_from_the_train_part_and_stable(jsonl):
    from rlfleet.common.dataset_task import DatasetEntries

    spec = task(jsonl, eval_fraction=0.25).dataset
    train = {DatasetEntries(spec, seed=3)[i]["problem"] for i in range(30)}
    held = DatasetEntries(spec, seed=3, part="eval")
    evals = {held[i]["problem"] for i in range(len(held))}
    assert len(train) == 30 and len(evals) == 10 and not train & evals
    assert evals == {DatasetEntries(spec, seed=3, part="eval")[i]["problem"] for i in range(10)}


def test_answer_regex_takes_the_ground_truth_out_of_a_worked_solution(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(
        json.dumps({"problem": "2 apples and 3 more?", "solution": "2 + 3 = 5\n#### 5"}) + "\n"
        + json.dumps({"problem": "no marker", "solution": "it is 7"}) + "\n"
    )  # fmt: skip
    source = PromptSource(task(path, answer_regex=r"####\s*(.+)$", shuffle=False))
    assert source.get(0)[1]["answer"] == "5"
    with pytest.raises(ValueError, match="finds nothing in row 1's 'solution': 'it is 7'"):
        source.get(1)
    for bad, why in (("####", "needs a group"), ("(", "not a valid regex")):
        with pytest.raises(ValueError, match=why):
            task(path, answer_regex=bad)


def _submit(tiny_model_dir, task_block: dict, **extra) -> JobSpec:
    spec = {"model": {"path": str(tiny_model_dir)}, "task": task_block,
            "reward": {"verifier": "math"}, **extra}  # fmt: skip
    return validate_spec(json.dumps(spec))


def test_a_dataset_job_is_accepted_at_submission(tiny_model_dir, jsonl):
    block = {"kind": "dataset", "dataset": {"path": str(jsonl), "prompt_column": "problem",
                                            "answer_column": "solution"}}  # fmt: skip
    assert _submit(tiny_model_dir, block).task.dataset.path == str(jsonl)


@pytest.mark.parametrize(
    "dataset, extra, message",
    [
        ({"path": "/nonexistent/train.jsonl"}, {}, "task.dataset.path '/nonexistent/train.jsonl': no such file"),
        ({"prompt_column": "prompt"}, {}, "task.dataset.prompt_column 'prompt' is not a column of"),
        ({"answer_column": "gold"}, {}, "(columns: problem, solution, level)"),
        ({"eval_split": "test"}, {}, "a json file holds one split; use eval_fraction"),
        ({"eval_split": "test", "eval_fraction": 0.1}, {}, "set eval_split or eval_fraction, not both"),
        ({}, {"reward": {"verifier": "reasoning_gym"}}, "for task.kind 'dataset' choose math"),
        (None, {}, "task.dataset is required when task.kind is 'dataset'"),
        ({"path": "someone/no-such-dataset"}, {}, "cannot be read with the Hugging Face Hub"),
        ({"path": "__README__"}, {}, "cannot be read with the Hugging Face Hub"),
        ({"format": "xml"}, {}, "task.dataset.format: Input should be 'auto', 'json'"),
        ({"path": "EMPTY"}, {}, "is empty: it holds no rows"),
        ({"eval_fraction": 0.999}, {}, "the train part of"),
    ],
)  # fmt: skip
def test_bad_dataset_specs_are_refused_with_the_field_named(
    tiny_model_dir, jsonl, dataset, extra, message
):
    block = {"kind": "dataset"}
    if dataset and dataset.get("path") == "EMPTY":
        dataset["path"] = str(jsonl.with_name("empty.jsonl"))
        jsonl.with_name("empty.jsonl").write_text("")
    if dataset is not None:
        block["dataset"] = {"path": str(jsonl), "prompt_column": "problem",
                            "answer_column": "solution", **dataset}  # fmt: skip
    with pytest.raises(InvalidArgument) as err:
        _submit(tiny_model_dir, block, **extra)
    assert message in err.value.message
    assert err.value.message.startswith("invalid job spec: ")


def test_a_transcripts_tool_message_keeps_its_name(tmp_path):
    """A tool result's ``name`` reaches the chat template, as an episode's does."""
    row = {"messages": [
        {"role": "user", "content": "What is 2 * 21?"},
        {"role": "assistant", "content": "<tool_call>...</tool_call>"},
        {"role": "tool", "name": "calculator", "content": "42"},
        {"role": "assistant", "content": "42"},
    ]}  # fmt: skip
    path = tmp_path / "transcripts.jsonl"
    path.write_text(json.dumps(row) + "\n")
    spec = TaskSpec.model_validate({"kind": "dataset", "prompt_format": "chat",
                                    "dataset": {"path": str(path), "messages_column": "messages"}})  # fmt: skip
    [(_, entry)] = prompts_of(spec)
    assert entry["transcript"][1] == {"role": "tool", "name": "calculator", "content": "42"}
    assert "name" not in entry["transcript"][0]
