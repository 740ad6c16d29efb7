"""Padding and response log-probs: a padded micro-batch gives each sample exactly
what an unpadded forward pass of that sample alone gives."""

from __future__ import annotations

import pytest
import torch
from rlfleet.common.errors import InvalidArgument
from rlfleet.trainer.batching import (
    collate,
    micro_batches,
    to_train_sample,
)
from rlfleet.trainer.logprobs import response_logprobs
from rlfleet.v1.common_pb2 import Sample


def _sample(sid, prompt, completion, *, group="g0", reward=1.0, logps=None):
    return Sample(
        sample_id=sid,
        group_id=group,
        prompt_token_ids=prompt,
        completion_token_ids=completion,
        inference_logprobs=logps if logps is not None else [-1.0] * len(completion),
        reward=reward,
    )


def test_a_missing_inference_logprob_is_invalid_argument():
    bad = _sample("s1", [1, 2], [3, 4, 5], logps=[-0.1, -0.2])
    with pytest.raises(InvalidArgument, match="inference_logprobs"):
        to_train_sample(bad, vocab_size=32)


@pytest.mark.parametrize(
    ("sample", "field"),
    [
        (_sample("s", [], [3]), "prompt_token_ids"),
        (_sample("s", [1, 99], [3]), "prompt_token_ids"),
        (_sample("s", [1], [3, -1]), "completion_token_ids"),
        (_sample("s", [1], [3], logps=[0.5]), "inference_logprobs"),
        (_sample("s", [1], [3], reward=float("nan")), "reward"),
    ],
)
def test_malformed_samples_name_the_field(sample, field):
    with pytest.raises(InvalidArgument, match=field):
        to_train_sample(sample, vocab_size=32)


def test_collate_pads_right_and_points_at_the_scoring_logits():
    samples = [
        to_train_sample(_sample("a", [1, 2, 3], [4, 5], logps=[-0.5, -0.25]), vocab_size=32),
        to_train_sample(_sample("b", [6], [7, 8, 9]), vocab_size=32),
        to_train_sample(_sample("c", [10, 11], []), vocab_size=32),
    ]
    mb = collate(samples, torch.tensor([1.0, 2.0, 3.0]), [0, 1, 2], pad_id=0)
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0], [10, 11, 0, 0, 0]]
    assert mb.attention_mask.tolist() == [[1] * 5, [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    # completion token j of a prompt of length P is scored by the logit at P + j − 1
    # (indices into the rows flattened: row 1 starts at 5)
    assert mb.score_index[0, :2].tolist() == [2, 3]
    assert mb.score_index[1].tolist() == [5, 6, 7]
    assert mb.position_ids is None
    assert mb.valid.tolist() == [[True, True, False], [True, True, True], [False] * 3]
    assert mb.logp_infer[0].tolist() == [-0.5, -0.25, 0.0]
    assert mb.advantages.tolist() == [1.0, 2.0, 3.0]


def test_environment_tokens_stay_in_the_sequence_but_out_of_the_loss():
    """A multi-turn episode: model turn, environment tokens (loss_mask False), model turn.
    The environment's tokens are in the input (the model reads them) but not scored."""
    episode = _sample("e", [1, 2], [3, 4, 20, 21, 5, 6])
    episode.loss_mask.extend([True, True, False, False, True, True])
    plain = to_train_sample(_sample("p", [1, 2], [3, 4]), vocab_size=32)
    mb = collate([to_train_sample(episode, vocab_size=32), plain], torch.zeros(2), [0, 1],
                 pad_id=0)  # fmt: skip
    assert mb.input_ids[0].tolist() == [1, 2, 3, 4, 20, 21, 5, 6]
    assert mb.valid.tolist() == [[True, True, False, False, True, True],
                                 [True, True, False, False, False, False]]  # fmt: skip
    assert plain.loss_mask == ()  # no mask: every token trained
    with pytest.raises(InvalidArgument, match="loss_mask has 2 entries for 6"):
        bad = _sample("b", [1], [3, 4, 20, 21, 5, 6])
        bad.loss_mask.extend([True, False])
        to_train_sample(bad, vocab_size=32)


def test_packed_collate_puts_every_sequence_in_one_row_with_restarting_positions():
    samples = [
        to_train_sample(_sample("a", [1, 2, 3], [4, 5]), vocab_size=32),
        to_train_sample(_sample("b", [6], [7, 8, 9]), vocab_size=32),
    ]
    mb = collate(samples, torch.tensor([1.0, 2.0]), [0, 1], pad_id=0, packed=True)
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]  # no padding at all
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert mb.attention_mask is None
    assert mb.score_index.tolist() == [[2, 3, 0], [5, 6, 7]]
    assert mb.valid.tolist() == [[True, True, False], [True, True, True]]


@pytest.mark.parametrize("packed", [False, True])
def test_padded_logprobs_equal_single_sequence_logprobs(model, packed):
    raw = [
        _sample("a", [1, 2, 3], [4, 5]),
        _sample("b", [6], [7, 8, 9, 10]),
        _sample("c", [11, 12], []),
        _sample("d", [13, 14, 15, 16], [17]),
    ]
    samples = [to_train_sample(s, vocab_size=32) for s in raw]
    temperature = 0.7
    batches = micro_batches(samples, torch.zeros(4), size=3, pad_id=0, packed=packed)
    assert sorted(r for mb in batches for r in mb.rows) == [0, 1, 2, 3]
    assert all(mb.input_ids.size(0) == (1 if packed else len(mb.rows)) for mb in batches)
    with torch.no_grad():
        for mb in batches:
            # A band no k reaches: the entropy at every response token.
            scored = response_logprobs(model, mb, temperature=temperature, chunk_tokens=2,
                                       entropy_band=(1e9, 1e9))  # fmt: skip
            logp, entropy = scored.logp, scored.entropy
            for b, row in enumerate(mb.rows):
                s = samples[row]
                ids = torch.tensor([list(s.prompt_ids + s.completion_ids)])
                logits = model(input_ids=ids).logits[0] / temperature
                p = len(s.prompt_ids)
                for j, tok in enumerate(s.completion_ids):
                    ref = torch.log_softmax(logits[p + j - 1], dim=-1)
                    assert float(logp[b, j]) == pytest.approx(float(ref[tok]), abs=1e-5)
                    h = -(ref.exp() * ref).sum()
                    assert float(entropy[b, j]) == pytest.approx(float(h), abs=1e-5)
                assert (logp[b, len(s.completion_ids) :] == 0).all()
