"""Job submission: a bad spec is refused with a message that names the field."""

from __future__ import annotations

import json

import pytest
from rlfleet.common.errors import AlreadyExists, InvalidArgument
from rlfleet.common.jobspec import JobSpec
from rlfleet.scheduler.jobs import JobState


@pytest.fixture
def core(make_core):
    return make_core(replica_addresses=["127.0.0.1:1"])


@pytest.mark.parametrize(
    ("override", "field", "what"),
    [
        ({"task": {"name": "no_such_task"}}, "task.name", "unknown task 'no_such_task'"),
        ({"algorithm": {"group_size": 1}}, "algorithm.group_size", "greater than or equal to 2"),
        ({"sampling": {"temperature": 9.0}}, "sampling.temperature", "less than or equal to 5"),
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"algorithm": {"learning_rate": 1e-5}}, "algorithm.learning_rate", "Extra inputs"),
        (
            {"scheduling": {"mode": "c3po", "pool_capacity": 1}},
            "scheduling.pool_capacity",
            "smaller than one group",
        ),
        ({"scheduling": {"mode": "fast"}}, "scheduling.mode", "'sync' or 'c3po'"),
        ({"reward": {"verifier": "regex"}}, "reward.pattern", "required"),
        (
            {"weights": {"group_backend": "nccl"}},
            "weights",
            'set weights.transport to "collective"',
        ),
        (
            {"weights": {"transport": "collective", "group_backend": "mpi"}},
            "weights.group_backend",
            "'gloo' or 'nccl'",
        ),  # fmt: skip
    ],
)
def test_bad_field_is_named(core, spec_of, override, field, what):
    with pytest.raises(InvalidArgument) as info:
        core.submit(spec_of(**override))
    assert field in info.value.message
    assert what in info.value.message
    assert core.list()[0] == []  # nothing was stored


def test_missing_model_dir(core, spec_of, tmp_path):
    with pytest.raises(InvalidArgument, match=r"model\.path .* not a Hugging Face model"):
        core.submit(spec_of(model={"path": str(tmp_path / "nowhere")}))


def test_model_dir_without_tokenizer(core, spec_of, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidArgument, match=r"model\.path .* no tokenizer\.json"):
        core.submit(spec_of(model={"path": str(tmp_path)}))


def test_missing_model_section(core):
    with pytest.raises(InvalidArgument, match="model: Field required"):
        core.submit(json.dumps({"steps": 3}))


@pytest.mark.parametrize("text", ["", "   ", "{not json", "[1, 2]"])
def test_not_a_spec(core, text):
    with pytest.raises(InvalidArgument, match="spec"):
        core.submit(text)


def test_valid_spec_is_queued_normalised(core, spec_of):
    job = core.submit(spec_of())
    assert job.state == JobState.QUEUED and job.total_steps == 2
    spec = JobSpec.model_validate_json(job.spec_json)
    assert spec.algorithm.prompts_per_step == 3
    assert json.loads(job.spec_json)["algorithm"]["lr"] == 1e-5  # defaults written out
    assert core.get(job.job_id) == job


def test_idempotent_submit(core, spec_of):
    first = core.submit(spec_of(), idempotency_key="abc")
    # The same spec written differently is the same job.
    same = json.dumps(json.loads(spec_of()), indent=2, sort_keys=True)
    assert core.submit(same, idempotency_key="abc").job_id == first.job_id
    with pytest.raises(AlreadyExists, match="'abc'"):
        core.submit(spec_of(steps=5), idempotency_key="abc")
    with pytest.raises(InvalidArgument, match="idempotency_key"):
        core.submit(spec_of(), idempotency_key="k" * 300)
    assert len(core.list()[0]) == 1


def test_list_rejects_unknown_state(core):
    with pytest.raises(InvalidArgument, match="state 'paused'"):
        core.list(state="paused")
