"""Real architectures (issue #14 item 7) through the trainer and the torch rollout engine.

For tiny random-initialised Llama, Qwen2, Qwen3, Qwen3-MoE and Mixtral models
(``rlfleet.common.architectures``), each test runs per family:

(a) the trainer: ``PolicyEngine`` loads the model directory and takes one GRPO update
    on hand-made samples; the weights change (the MoEs' experts and routers too);
(b) the published weights: the trainer's weights under checkpoint names
    (``checkpoint_names.to_checkpoint_names``) are exactly the names of the model's own
    checkpoint file (no fused ``gate_up_proj``; one tensor per expert); saved with
    safetensors next to the config they load with ``from_pretrained`` and give the
    trainer's logits bit for bit, and converted back (``to_model_names``) they load
    into a live model with a strict ``load_state_dict``, bit for bit again; the
    payload the trainer publishes and writes as a checkpoint's ``model.safetensors``
    (``publish.gather_payload``), laid out from ``checkpoint_specs`` and filled through
    ``gather_in_checkpoint_names``, holds the same tensors and loads the same way;
    the trainer's resume path (``PolicyEngine.load_weights`` of a version fetched back
    from weight-sync) takes them converted back;
(c) the torch rollout engine: loads the model directory, generates greedily as a full
    transformers forward does, and takes the published version (converted back to
    in-memory names: ``TorchEngine.load_state_dict`` checks names against the live
    transformers model) with greedy tokens and log-probs matching the trained model.

The trainer publishes checkpoint names itself (``PolicyEngine.weight_specs``/``gather``
through ``checkpoint_specs``/``gather_in_checkpoint_names``), and
``PolicyEngine.load_weights`` and ``TorchEngine.load_state_dict`` take them
(``to_model_names``): tests of each, for every family, MoEs included.

vLLM's side of the same is ``tests/unit/rollout/test_vllm_architectures.py`` (.venv-vllm).
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from rlfleet.common.architectures import ARCHITECTURES, MOE_ARCHITECTURES, build_model
from rlfleet.common.checkpoint_names import (
    checkpoint_specs,
    gather_in_checkpoint_names,
    to_checkpoint_names,
    to_model_names,
)
from rlfleet.common.jobspec import JobSpec
from rlfleet.common.weights import decode_state_dict
from rlfleet.rollout.engine import Sampling, SeqRequest
from rlfleet.rollout.torch_engine import TorchEngine
from rlfleet.trainer.batching import TrainSample, micro_batches
from rlfleet.trainer.checkpoint import copy_tokenizer_files
from rlfleet.trainer.engine import PolicyEngine
from rlfleet.trainer.logprobs import response_logprobs
from rlfleet.trainer.publish import gather_payload
from safetensors import safe_open
from safetensors.torch import save_file

CPU = torch.device("cpu")
LOGPROB_ATOL = 1e-4  # the engine suite's bound (float32 on CPU)
PROMPTS = [[5, 40, 100], [17, 9], [24, 54, 109, 300, 301], [31, 61, 124, 7]]
_FUSED = ("gate_up_proj", "experts.down_proj")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hand_made_samples(model, n: int = 8, vocab: int = 300) -> list[TrainSample]:
    """Two groups of four with different rewards; inference log-probs a little off the
    model's own (so IcePop keeps the tokens and the ratio is not exactly one)."""
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
class Trained:
    arch: str
    base_dir: Path
    engine: PolicyEngine
    before: dict[str, torch.Tensor]  # in-memory names (transformers 5), before the update
    after: dict[str, torch.Tensor]
    metrics: dict[str, float]
    published: dict[str, torch.Tensor]  # checkpoint names, after the update
    saved_dir: Path  # config + tokenizer + the published tensors (safetensors)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def trained(request, tmp_path_factory) -> Trained:
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    base = build_model(arch, root / "base", seed=ARCHITECTURES.index(arch))
    spec = JobSpec.model_validate({"model": {"path": str(base)}, "steps": 2, "algorithm": {
        "group_size": 4, "prompts_per_step": 2, "lr": 1e-2, "micro_batch_size": 4}})  # fmt: skip
    engine = PolicyEngine(spec, CPU)
    torch.manual_seed(0)
    engine.load(str(base))
    before = {k: v.detach().clone() for k, v in engine.lm.state_dict().items()}
    metrics = engine.update(hand_made_samples(engine.root), step=0)
    after = {k: v.detach().clone() for k, v in engine.lm.state_dict().items()}
    published = to_checkpoint_names(engine.lm, engine.lm.state_dict())
    saved = root / "published"
    saved.mkdir()
    shutil.copy(base / "config.json", saved / "config.json")
    copy_tokenizer_files(base, saved)
    # Every key, tied ones too, as a publisher sends them; copies (safetensors refuses
    # tensors that share memory: the per-expert views of one fused tensor do).
    save_file({k: v.detach().clone() for k, v in published.items()},
              str(saved / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    return Trained(arch, base, engine, before, after, metrics, published, saved)


def file_keys(path: Path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    ids = torch.tensor([[5, 40, 100, 17, 9, 24, 54, 109, 300, 2, 31, 61]])
    return model(input_ids=ids).logits


@torch.no_grad()
def ref_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs by a full forward pass at every step."""
    ids, toks, logps = list(prompt), [], []
    for _ in range(n):
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        tok = int(logp.argmax())
        toks.append(tok)
        logps.append(float(logp[tok]))
        ids.append(tok)
        if tok == model.config.eos_token_id:
            break
    return toks, logps


def generate(engine, n: int = 10):
    results = []
    seqs = [SeqRequest(f"s{i}", p) for i, p in enumerate(PROMPTS)]
    engine.generate(seqs, Sampling(max_new_tokens=n, temperature=0.0),
                    abort=threading.Event(), on_result=results.append)  # fmt: skip
    return {r.seq_id: r for r in results}


def assert_matches(results, model, n: int = 10) -> None:
    for i, prompt in enumerate(PROMPTS):
        toks, logps = ref_greedy(model, prompt, n)
        got = results[f"s{i}"]
        assert got.token_ids == toks
        diff = max(abs(a - b) for a, b in zip(got.logprobs, logps, strict=True))
        assert diff <= LOGPROB_ATOL, f"log-probs differ by {diff:.2e}"


# -- (a) the trainer -----------------------------------------------------------------------


def test_one_grpo_update_changes_the_weights(trained):
    m = trained.metrics
    assert m["policy_updates"] == 1.0 and m["update_skipped"] == 0.0
    assert m["grad_norm"] > 0 and all(v == v for v in m.values())  # no NaN
    changed = {k for k in trained.before if not torch.equal(trained.before[k], trained.after[k])}
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert "model.embed_tokens.weight" in changed
    if trained.arch in MOE_ARCHITECTURES:  # the experts and the router learned too
        for layer in range(2):
            assert f"model.layers.{layer}.mlp.experts.gate_up_proj" in changed
            assert f"model.layers.{layer}.mlp.experts.down_proj" in changed
            assert f"model.layers.{layer}.mlp.gate.weight" in changed
    assert len(changed) >= 0.9 * len(trained.before)


# -- (b) the published weights -------------------------------------------------------------


def test_published_names_are_the_checkpoint_names(trained):
    names = set(trained.published)
    on_disk = file_keys(trained.base_dir)  # what save_pretrained wrote (tied head left out)
    tied = {"lm_head.weight"} if trained.engine.lm.config.tie_word_embeddings else set()
    assert names == on_disk | tied
    assert not [n for n in names if any(f in n for f in _FUSED)]
    if trained.arch == "qwen3_moe":
        for layer in range(2):
            for e in range(4):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in names
    if trained.arch == "mixtral":
        for layer in range(2):
            assert f"model.layers.{layer}.block_sparse_moe.gate.weight" in names
            for e in range(4):
                for w in ("w1", "w2", "w3"):
                    assert f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" in names
    if trained.arch not in MOE_ARCHITECTURES:  # dense: the names in memory already are
        assert names == set(trained.after)


def test_saved_published_weights_load_with_identical_logits(trained):
    """safetensors file of the published names + config -> from_pretrained: same logits."""
    assert file_keys(trained.saved_dir) == set(trained.published)
    reloaded = load(trained.saved_dir)
    assert torch.equal(logits(reloaded), logits(trained.engine.lm))


def test_published_weights_converted_back_load_strictly(trained):
    fresh = load(trained.base_dir)
    assert not torch.equal(logits(fresh), logits(trained.engine.lm))
    back = to_model_names(fresh, trained.published)
    assert set(back) == set(trained.after)
    fresh.load_state_dict(back, strict=True)
    assert torch.equal(logits(fresh), logits(trained.engine.lm))
    assert all(torch.equal(back[k], trained.after[k]) for k in back)


def write_checkpoint_dir(payload, model, tokenizer_dir: Path, out: Path) -> Path:
    """What ``CheckpointStore.commit`` writes: the payload as model.safetensors, the config,
    the generation config and the tokenizer."""
    out.mkdir()
    (out / "model.safetensors").write_bytes(bytes(payload))
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    copy_tokenizer_files(tokenizer_dir, out)
    return out


def test_payload_in_checkpoint_names_loads_with_identical_logits(trained, tmp_path):
    """The proposed wiring of the publisher: layout from ``checkpoint_specs``, buckets
    filled through ``gather_in_checkpoint_names`` over a gather by in-memory names (what
    ``PolicyEngine.gather`` does today; one rank: the live tensors), small buckets so a
    fused tensor's experts fall in several."""
    lm = trained.engine.lm
    live = lm.state_dict()
    specs = [(n, shape, dtype) for n, (shape, dtype) in checkpoint_specs(lm).items()]
    payload = gather_payload(
        specs,
        lambda names: gather_in_checkpoint_names(lm, names, lambda ns: {n: live[n] for n in ns}),
        bytearray,
        bucket_bytes=4096,
    )
    got = decode_state_dict(payload)
    assert set(got) == set(trained.published)
    assert all(torch.equal(got[k], trained.published[k]) for k in got)
    path = write_checkpoint_dir(payload, lm, trained.base_dir, tmp_path / "ckpt")
    assert file_keys(path) == set(trained.published)
    assert torch.equal(logits(load(path)), logits(lm))


def test_payload_as_the_trainer_builds_it_has_checkpoint_names(trained):
    engine = trained.engine
    payload = gather_payload(engine.weight_specs(), engine.gather, bytearray, bucket_bytes=4096)
    got = decode_state_dict(payload)
    assert set(got) == set(trained.published)
    assert all(torch.equal(got[k], trained.published[k]) for k in got)


def test_trainer_resumes_from_a_published_version(trained):
    """After a crash the trainer takes a version back from weight-sync
    (``PolicyEngine.load_weights``): checkpoint names converted back load strictly."""
    engine = PolicyEngine(trained.engine.spec, CPU)
    engine.load(str(trained.base_dir))
    engine.load_weights(to_model_names(engine.lm, trained.published))
    assert torch.equal(logits(engine.lm), logits(trained.engine.lm))


def test_trainer_load_weights_takes_checkpoint_names(trained):
    engine = PolicyEngine(trained.engine.spec, CPU)
    engine.load(str(trained.base_dir))
    engine.load_weights(trained.published)
    assert torch.equal(logits(engine.lm), logits(trained.engine.lm))


# -- (c) the torch rollout engine -----------------------------------------------------------


@pytest.fixture
def torch_engine(trained):
    engine = TorchEngine(device="cpu", dtype="float32")
    engine.load_model(str(trained.base_dir))
    yield engine
    engine.close()


def test_torch_engine_generates_and_takes_the_published_version(trained, torch_engine):
    from transformers import AutoConfig

    before = generate(torch_engine)
    assert_matches(before, load(trained.base_dir))
    # The engine checks names against the live transformers model: in-memory names.
    config = AutoConfig.from_pretrained(str(trained.base_dir))
    torch_engine.load_state_dict(to_model_names(config, trained.published), version=1)
    after = generate(torch_engine)
    assert_matches(after, trained.engine.lm)
    assert_matches(after, load(trained.saved_dir))
    assert all(r.versions == [1] * len(r.token_ids) for r in after.values())
    assert any(after[k].logprobs != before[k].logprobs for k in after)


def test_torch_engine_load_state_dict_takes_checkpoint_names(trained, torch_engine):
    torch_engine.load_state_dict(trained.published, version=1)
    assert_matches(generate(torch_engine), trained.engine.lm)
