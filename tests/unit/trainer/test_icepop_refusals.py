"""What IcePop cannot work with is refused up front, with a sentence naming the field:
a band with α > β or a non-positive bound (job spec, and the trainer's InitJob),
and a sample without a usable inference log-prob for every completion token.
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from rlfleet.common.errors import InvalidArgument
from rlfleet.common.grpc_server import describe_validation_error
from rlfleet.common.jobspec import CorrectionSpec, JobSpec
from rlfleet.trainer.batching import to_train_sample
from rlfleet.trainer.servicer import TrainerServicer
from rlfleet.v1 import trainer_pb2
from rlfleet.v1.common_pb2 import Sample


def _spec(correction: dict) -> dict:
    return {"model": {"path": "/models/x"}, "correction": correction}


def test_defaults_are_the_papers():
    c = JobSpec.model_validate(_spec({})).correction
    assert (c.kind, c.alpha, c.beta, c.tis_cap) == ("icepop", 0.5, 5.0, 2.0)


@pytest.mark.parametrize(
    ("correction", "says"),
    [
        ({"alpha": 3.0, "beta": 2.0}, "correction.alpha (3.0) must not exceed correction.beta"),
        ({"alpha": 0.0}, "correction.alpha: Input should be greater than 0"),
        ({"alpha": -0.5}, "correction.alpha: Input should be greater than 0"),
        ({"beta": 0.0}, "correction.beta: Input should be greater than 0"),
        ({"tis_cap": 0.0}, "correction.tis_cap: Input should be greater than 0"),
        ({"kind": "clip"}, "correction.kind"),
        ({"gamma": 1.0}, "correction.gamma"),
    ],
)
def test_bad_bands_are_refused_naming_the_field(correction, says):
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(_spec(correction))
    assert says in describe_validation_error(info.value)


def test_a_one_point_band_is_allowed():
    assert CorrectionSpec(alpha=1.0, beta=1.0).alpha == 1.0


def test_trainer_init_job_refuses_a_bad_band_as_invalid_argument():
    servicer = TrainerServicer(core=None)  # the spec is refused before the core is reached
    request = trainer_pb2.InitJobRequest(
        job_id="j", spec_json=json.dumps(_spec({"alpha": 6.0, "beta": 5.0}))
    )
    with pytest.raises(InvalidArgument, match=r"spec_json: .*correction\.alpha \(6\.0\)"):
        servicer.InitJob(request, None)


def _sample(logps: list[float], completion=(5, 6, 7)) -> Sample:
    return Sample(
        sample_id="g0-1",
        group_id="g0",
        prompt_token_ids=[1, 2],
        completion_token_ids=list(completion),
        inference_logprobs=logps,
        reward=1.0,
    )


@pytest.mark.parametrize(
    ("logps", "says"),
    [
        ([], "inference_logprobs has 0 entries for 3 completion_token_ids"),
        ([-0.1, -0.2], "inference_logprobs has 2 entries for 3 completion_token_ids"),
        ([-0.1, float("nan"), -0.2], "must be finite log-probabilities"),
        ([-0.1, float("-inf"), -0.2], "must be finite log-probabilities"),
        ([-0.1, 0.7, -0.2], "must be finite log-probabilities"),
    ],
)
def test_a_sample_without_usable_inference_logprobs_is_refused(logps, says):
    with pytest.raises(InvalidArgument, match="sample g0-1: ") as info:
        to_train_sample(_sample(logps), vocab_size=32)
    assert says in info.value.message


def test_an_empty_response_needs_no_inference_logprob():
    sample = to_train_sample(_sample([], completion=()), vocab_size=32)
    assert sample.completion_ids == () and sample.logp_infer == ()
