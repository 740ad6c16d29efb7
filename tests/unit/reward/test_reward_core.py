"""RewardCore: concurrent scoring, isolation of verifier failures, validation,
and writes to the real Redis experience buffer (idempotent by sample_id).
"""

from __future__ import annotations

import json
import threading

import pytest
import reasoning_gym
import redis
from rlfleet.common.buffer import setup_buffer
from rlfleet.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from rlfleet.common.jobspec import RewardSpec
from rlfleet.common.tasks import entry_to_json
from rlfleet.reward.core import RewardCore, parse_verifier_config
from rlfleet.reward.verifiers import VERIFIERS, Verifier
from rlfleet.v1.common_pb2 import Sample


def _samples(n: int, *, job_id: str = "job-1", wrong_every: int = 2) -> list[Sample]:
    """n samples of real basic_arithmetic tasks; every ``wrong_every``-th answer is wrong."""
    ds = reasoning_gym.create_dataset("basic_arithmetic", size=n, seed=3)
    out = []
    for i in range(n):
        entry = ds[i]
        answer = entry["answer"] if i % wrong_every else str(int(entry["answer"]) + 1)
        out.append(
            Sample(
                job_id=job_id,
                sample_id=f"g{i // 4}-{i % 4}",
                group_id=f"g{i // 4}",
                completion_token_ids=[5, 6, 7],
                inference_logprobs=[-0.1, -0.2, -0.3],
                token_versions=[0, 0, 0],
                completion_text=f" {answer}\n",
                task_json=entry_to_json(entry),
            )
        )
    return out


@pytest.fixture
def core():
    core = RewardCore(buffer=None, max_workers=4)
    yield core
    core.close()


@pytest.fixture
def buffered(redis_url):
    buffer = setup_buffer("redis", redis_url, max_len=100)
    core = RewardCore(buffer=buffer, max_workers=4)
    yield core, buffer
    core.close()


def _score(core, samples, *, verifier="reasoning_gym", config=None, write=False, job_id="job-1"):
    return core.score(
        job_id=job_id,
        verifier=verifier,
        verifier_config=config,
        samples=samples,
        write_to_buffer=write,
    )


def test_batch_is_scored_in_request_order(core):
    samples = _samples(24)
    result = _score(core, samples)
    assert result.rewards == [0.0 if i % 2 == 0 else 1.0 for i in range(24)]
    assert result.written == 0


def test_concurrent_batches_do_not_mix(core):
    from concurrent.futures import ThreadPoolExecutor

    batches = [_samples(12, wrong_every=k) for k in (1, 2, 3, 12)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: _score(core, b).rewards, batches))
    for k, rewards in zip((1, 2, 3, 12), results, strict=True):
        assert rewards == [0.0 if i % k == 0 else 1.0 for i in range(12)]


def test_a_verifier_that_raises_costs_only_its_sample(core):
    samples = _samples(4, wrong_every=99)  # all right except index 0
    ds = reasoning_gym.create_dataset("word_sorting", size=1, seed=0)
    good = ds[0]
    broken = dict(good, metadata={"source_dataset": "word_sorting"})  # scorer needs more
    samples[1].task_json = json.dumps(broken)
    samples[1].completion_text = " " + good["answer"]
    samples[2].task_json = entry_to_json(good)
    samples[2].completion_text = " " + good["answer"]
    assert _score(core, samples).rewards == [0.0, 0.0, 1.0, 1.0]


def test_empty_batch(core):
    assert _score(core, []).rewards == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"verifier": "llm_judge"}, "verifier 'llm_judge' is unknown"),
        ({"verifier": "regex", "config": {"pattern": "(x"}}, "verifier_config_json"),
        ({"verifier": "regex", "config": {}}, "pattern"),
        ({"verifier": "exact", "config": {"bogus": 1}}, "bogus"),
    ],
)
def test_bad_verifier_settings_are_invalid_argument(core, kwargs, field):
    with pytest.raises(InvalidArgument, match=field):
        _score(core, _samples(2), **kwargs)


def test_bad_task_json_is_invalid_argument(core):
    samples = _samples(3)
    samples[2].task_json = "{not json"
    with pytest.raises(InvalidArgument, match=r"samples\[2\].task_json is not valid JSON"):
        _score(core, samples)
    samples[2].task_json = "[1, 2]"
    with pytest.raises(InvalidArgument, match="JSON object"):
        _score(core, samples)
    samples[2].task_json = json.dumps({"answer": "1"})  # no metadata.source_dataset
    with pytest.raises(InvalidArgument, match=r"samples\[2\].*source_dataset"):
        _score(core, samples)


def test_regex_needs_no_task(core):
    samples = [Sample(sample_id="a", completion_text=" yes"), Sample(sample_id="b")]
    result = _score(core, samples, verifier="regex", config={"pattern": "yes|no"})
    assert result.rewards == [1.0, 0.0]


def test_parse_verifier_config():
    assert parse_verifier_config("") == {}
    assert parse_verifier_config('{"pattern": "a"}') == {"pattern": "a"}
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        parse_verifier_config("{")
    with pytest.raises(InvalidArgument, match="JSON object"):
        parse_verifier_config("[]")


def test_write_to_buffer_and_idempotent_repeat(buffered, redis_url):
    core, buffer = buffered
    samples = _samples(8)
    first = _score(core, samples, write=True)
    assert first.written == 8
    again = _score(core, samples, write=True)  # a retried Score call
    assert again.written == 0
    assert again.rewards == first.rewards
    assert buffer.length("job-1") == 8

    entries = buffer.read("job-1", "trainer-0", count=100)
    by_id = {e.sample.sample_id: e.sample for e in entries}
    assert len(by_id) == 8
    for s, reward in zip(samples, first.rewards, strict=True):
        stored = by_id[s.sample_id]
        assert stored.reward == reward
        assert stored.job_id == "job-1"
        assert list(stored.inference_logprobs) == pytest.approx(list(s.inference_logprobs))
        assert stored.completion_text == s.completion_text
    assert redis.Redis.from_url(redis_url).exists("rlfleet:exp:job-1")


def test_samples_without_job_id_take_the_requests(buffered):
    core, buffer = buffered
    samples = _samples(2, job_id="")
    assert _score(core, samples, write=True, job_id="job-2").written == 2
    assert {e.sample.job_id for e in buffer.read("job-2", "t", count=10)} == {"job-2"}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s[1].ClearField("sample_id"), r"samples\[1\].sample_id is empty"),
        (lambda s: setattr(s[2], "sample_id", s[0].sample_id), "appears twice"),
        (lambda s: setattr(s[0], "job_id", "other"), "differs from the request's job_id"),
    ],
)
def test_write_validation(buffered, mutate, message):
    core, buffer = buffered
    samples = _samples(3)
    mutate(samples)
    with pytest.raises(InvalidArgument, match=message):
        _score(core, samples, write=True)
    assert buffer.length("job-1") == 0  # nothing half-written


def test_write_needs_a_job_id(buffered):
    core, _ = buffered
    with pytest.raises(InvalidArgument, match="job_id is required"):
        _score(core, _samples(1), write=True, job_id="")


def test_write_without_a_buffer_is_refused(core):
    with pytest.raises(FailedPrecondition):
        _score(core, _samples(1), write=True)


def test_full_buffer_is_resource_exhausted_and_retry_succeeds(redis_url):
    buffer = setup_buffer("redis", redis_url, max_len=4)
    core = RewardCore(buffer=buffer, max_workers=2)
    try:
        assert _score(core, _samples(4), write=True).written == 4
        more = _samples(8)[4:]
        with pytest.raises(ResourceExhausted):
            _score(core, more, write=True)
        # The trainer consumes what is there; the caller's retry then goes through.
        entries = buffer.read("job-1", "trainer-0", count=10)
        buffer.ack("job-1", [e.entry_id for e in entries])
        assert _score(core, more, write=True).written == 4
    finally:
        core.close()


class _BlockingVerifier(Verifier):
    """Blocks on its answer "block" until released: a verifier that hangs."""

    kind = "blocking"
    release = threading.Event()

    def score(self, completion_text, entry):
        if self.answer(completion_text) == "block":
            self.release.wait(30)
        return 1.0


def test_a_hanging_verifier_scores_0_after_the_deadline(monkeypatch):
    monkeypatch.setitem(VERIFIERS, "blocking", _BlockingVerifier)
    # The test lasts the whole deadline (the hanging sample is given up only then); the
    # two quick samples must be scored within it, which 0.5 s left little room for on a
    # loaded 2-core machine.
    core = RewardCore(buffer=None, max_workers=2, score_timeout_s=2.0)
    try:
        samples = [Sample(completion_text=t) for t in (" ok", " block", " ok")]
        assert _score(core, samples, verifier="blocking").rewards == [1.0, 0.0, 1.0]
    finally:
        _BlockingVerifier.release.set()
        core.close()


def test_the_jobs_reward_spec_is_accepted_as_config(core):
    """The scheduler sends ``RewardSpec.model_dump_json()`` as verifier_config_json."""
    spec = RewardSpec(verifier="reasoning_gym")
    config = parse_verifier_config(spec.model_dump_json())
    assert _score(core, _samples(2), config=config).rewards == [0.0, 1.0]

    regex = parse_verifier_config(RewardSpec(verifier="regex", pattern=r"-?\d+").model_dump_json())
    assert _score(core, _samples(2), verifier="regex", config=regex).rewards == [1.0, 1.0]

    with pytest.raises(InvalidArgument, match="names verifier 'math'"):
        _score(core, _samples(1), config={"verifier": "math"})


WEIGHTED = {
    "verifier": "weighted",
    "terms": [
        {"verifier": "regex", "weight": 0.1, "name": "format", "settings": {"pattern": "-?[0-9]+"}},
        {"verifier": "math", "weight": 1.0},
    ],
}


def test_a_weighted_reward_sums_its_terms_and_reports_each(core):
    samples = _samples(4)  # answers 0 and 2 are wrong numbers, 1 and 3 right
    samples[2].completion_text = " twelve\n"  # neither a number nor right
    spec = RewardSpec.model_validate(WEIGHTED)
    result = _score(core, samples, verifier="weighted", config=json.loads(spec.model_dump_json()))
    assert result.terms == {"format": [1.0, 1.0, 0.0, 1.0], "math": [0.0, 1.0, 0.0, 1.0]}
    assert result.rewards == pytest.approx([0.1, 1.1, 0.0, 1.1])
    plain = _score(core, samples, verifier="math")
    assert plain.terms == {} and plain.rewards == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "terms, message",
    [
        ([{"verifier": "regex", "weight": 1.0}], "terms[0] (regex): "),
        ([{"verifier": "weighted", "weight": 1.0}], "cannot nest"),
        (
            [{"verifier": "math", "weight": 1.0}, {"verifier": "math", "weight": 2.0}],
            "named 'math'",
        ),
        ([{"verifier": "nope", "weight": 1.0}], "unknown verifier 'nope'"),
        ([], "terms"),
    ],
)
def test_bad_weighted_settings_are_refused_before_scoring(core, terms, message):
    with pytest.raises(
        InvalidArgument, match="verifier_config_json for 'weighted' is invalid"
    ) as e:
        _score(core, _samples(2), verifier="weighted", config={"terms": terms})
    assert message in e.value.message


def test_a_weighted_reward_spec_names_its_terms():
    with pytest.raises(ValueError, match="reward.terms is required"):
        RewardSpec(verifier="weighted")
    with pytest.raises(ValueError, match="two terms are named 'exact'"):
        RewardSpec.model_validate(
            {"verifier": "weighted", "terms": [{"verifier": "exact", "weight": 1},
                                               {"verifier": "exact", "weight": 2}]}
        )  # fmt: skip
    with pytest.raises(ValueError, match="reward.terms is set but"):
        RewardSpec.model_validate({"verifier": "math", "terms": WEIGHTED["terms"]})
