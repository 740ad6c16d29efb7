"""The torch engine's KV batch appends keys and values in place (``RoomyLayer``).

It must compute exactly what transformers' own ``DynamicLayer`` computes, through
everything a batch does: decode steps, rows leaving (lazily, kept in the tensors until
a quarter of them have left; then compacted, trimming padding columns) and rows
joining (merge of a newly prefilled batch of another width).
"""

from __future__ import annotations

import random

import pytest
import torch
from rlfleet.rollout import kvbatch
from rlfleet.rollout.engine import SeqRequest
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def _rows(prefix: str, lengths: list[int]) -> list[kvbatch.Row]:
    return [
        kvbatch.Row(
            call=None,
            req=SeqRequest(seq_id=f"{prefix}{i}", prompt_token_ids=list(range(1, 1 + n))),
            tokens=[],
            logprobs=[],
            versions=[],
            limit=1000,
            rng=random.Random(i),
            temperature=0.0,  # greedy: any difference in the logits shows in the tokens
        )
        for i, n in enumerate(lengths)
    ]


def _run(model, monkeypatch, *, roomy: bool, lazy: bool = True):
    if not roomy:
        monkeypatch.setattr(kvbatch, "roomy_cache", lambda config: DynamicCache(config=config))
    if not lazy:  # every row that leaves is dropped from the tensors at once
        monkeypatch.setattr(kvbatch.KVBatch, "DEAD_SHARE", -1.0)
    first, second, third = (
        _rows("a", [3, 17, 40, 8, 25, 60]),
        _rows("b", [5, 90]),
        _rows("c", [2, 6]),
    )
    cpu = torch.device("cpu")
    with torch.no_grad():
        batch = kvbatch.KVBatch.prefill(model, first, device=cpu, version=0)
        for step in range(90):
            batch.decode(model, version=0)
            if step == 5:  # one row of six leaves: it stays in the tensors, ignored
                batch = batch.select([0, 1, 2, 3, 4])
                assert not lazy or (batch.live is not None and len(batch.pos) == 6)
            if step == 10:  # a third has left: compacted, and the longest prompt's padding
                batch = batch.select([0, 1, 3, 4])  # columns are trimmed
                assert batch.live is None and len(batch.pos) == 4
            if step == 30:  # a wider batch joins
                batch = batch.merge(kvbatch.KVBatch.prefill(model, second, device=cpu, version=0))
            if step == 45:
                batch = batch.select([0, 1, 2, 3, 5])
                assert not lazy or batch.live is not None
            if step == 50:  # a narrower batch joins: into spare rows, beside the left row
                batch = batch.merge(kvbatch.KVBatch.prefill(model, third, device=cpu, version=0))
            if step == 60:  # a row left lazily, then more: the merge-free path compacts
                batch = batch.select([1, 2, 4])
                assert batch.live is None and len(batch.pos) == 3
    monkeypatch.undo()
    return [(r.req.seq_id, r.tokens, r.logprobs) for r in first + second + third]


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy-compaction", "eager-compaction"])
def test_roomy_layers_compute_what_dynamic_layers_compute(model, monkeypatch, lazy):
    roomy = _run(model, monkeypatch, roomy=True)
    plain = _run(model, monkeypatch, roomy=False, lazy=lazy)
    for (sid, tokens, logps), (_, tokens_ref, logps_ref) in zip(roomy, plain, strict=True):
        assert tokens == tokens_ref, sid
        # Strided views or rows left in the batch may change a reduction's order in
        # attention: last bits only.
        torch.testing.assert_close(torch.tensor(logps), torch.tensor(logps_ref), atol=1e-5, rtol=0)


def test_decoding_writes_into_the_buffer_instead_of_copying_it(model):
    rows = _rows("c", [4, 9])
    with torch.no_grad():
        batch = kvbatch.KVBatch.prefill(model, rows, device=torch.device("cpu"), version=0)
        layer = batch.cache.layers[0]
        assert isinstance(layer, kvbatch.RoomyLayer)
        buffer = layer._kbuf.data_ptr()
        batch.decode(model, version=0)
        batch.decode(model, version=0)
    assert layer._kbuf.data_ptr() == buffer  # appended in place, no new buffer
    assert layer.keys.data_ptr() == buffer and layer.keys.shape[-2] == 9 + 2


def test_a_narrower_batch_joins_in_spare_rows_without_copying_the_cache(model):
    cpu = torch.device("cpu")
    with torch.no_grad():
        batch = kvbatch.KVBatch.prefill(model, _rows("d", [12, 30]), device=cpu, version=0)
        batch.decode(model, version=0)
        layer = batch.cache.layers[0]
        buffer, width = layer._kbuf.data_ptr(), layer.keys.shape[-2]
        batch = batch.merge(
            kvbatch.KVBatch.prefill(model, _rows("e", [3, 7]), device=cpu, version=0)
        )
        assert layer._kbuf.data_ptr() == buffer and layer.keys.shape[:3] == (4, 2, width)
        # The joined rows are left-padded with zeros to the batch's width, masked out.
        assert batch.mask[2:].sum(dim=1).tolist() == [3, 7]
        assert not layer.keys[2, :, : width - 3].any()
        batch.decode(model, version=0)
    assert layer._kbuf.data_ptr() == buffer
