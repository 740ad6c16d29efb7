"""The RL job specification: one typed model shared by the scheduler, trainer,
reward service, CLI and (later) the REST API, so a spec is validated the same
way wherever it enters. Bad values fail with a message that names the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rlfleet.common.tracking_spec import TrackingSpec

VERIFIERS = ("reasoning_gym", "math", "exact", "regex", "code", "reward_model")


def is_model_dir(path: str | Path) -> bool:
    """True if ``path`` holds a Hugging Face model (config.json); False for any path the
    filesystem refuses (too long, not a directory, no permission) instead of raising."""
    try:
        return (Path(path) / "config.json").is_file()
    except (OSError, ValueError):
        return False


def check_sequence_classifier(path: str, *, field: str = "reward.reward_model.path") -> None:
    """Raises ValueError, naming ``field``, unless ``path`` holds a sequence classifier.

    Reads ``config.json`` only (no weights, no torch).
    """
    config_file = Path(path) / "config.json"
    try:
        text = config_file.read_text()
    except (OSError, ValueError):
        raise ValueError(
            f"{field} {path!r} is not a Hugging Face model directory (no config.json)"
        ) from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{field} {path!r} has a config.json that is not JSON: {exc}") from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    names = [a for a in architectures or [] if isinstance(a, str)]
    if not any(name.endswith("ForSequenceClassification") for name in names):
        what = f"a {', '.join(names)} model" if names else "a model of no named architecture"
        raise ValueError(
            f"{field} {path!r} holds {what}, not a sequence classifier "
            "(AutoModelForSequenceClassification)"
        )


class _Spec(BaseModel):
    # No NaN/inf: a spec must survive a JSON round trip between services.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


class ModelSpec(_Spec):
    path: str = ""
    """Directory of a Hugging Face-format causal LM (config.json, weights, tokenizer.json)."""
    from_job: str = ""
    """Start from another job's final checkpoint instead of ``path``: the id of a job that
    succeeded. The scheduler resolves it at submission and records the checkpoint
    directory in ``path``, so SFT -> RLVR -> RLHF is three submissions."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision the trainer computes in (forward and backward, under autocast when it
    differs from ``master_dtype``); bfloat16 is the usual choice on GPUs. float16 runs
    without loss scaling: prefer bfloat16."""
    master_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of the trainer's weights, gradients and AdamW state. Low precision here
    only when named: AdamW on bf16 weights rounds updates below half an ulp away (at lr
    2e-6 most weights never move), so the trainer logs a warning."""

    @model_validator(mode="after")
    def _names_a_model(self) -> ModelSpec:
        if not self.path.strip() and not self.from_job.strip():
            raise ValueError("model.path or model.from_job must name the model to start from")
        return self

    def check_exists(self) -> None:
        """Raises ValueError unless the directory holds a Hugging Face model."""
        if not is_model_dir(self.path):
            raise ValueError(
                f"model.path {self.path!r} is not a Hugging Face model directory (no config.json)"
            )


class DatasetSpec(_Spec):
    path: str = Field(min_length=1)
    """A JSONL/JSON, Parquet or CSV file, a directory written by ``save_to_disk``, or a
    Hugging Face Hub dataset name (needs the network; untested here)."""
    format: Literal["auto", "json", "parquet", "csv", "disk", "hub"] = "auto"
    """How to read ``path``; auto: by its suffix, a directory is ``disk``, else ``hub``."""
    split: str = "train"
    """The split prompts come from (a file holds one split, "train")."""
    prompt_column: str = "question"
    """The column holding the prompt text; it fills ``{question}`` of the template."""
    messages_column: str = ""
    """A column of chat messages (``[{"role": ..., "content": ...}, ...]``) used instead of
    ``prompt_column``: the conversation up to its last user turn is the prompt (needs
    ``task.prompt_format = "chat"``); for SFT a final assistant turn is the completion.
    The answer column is then optional (verifiers that compare with it need it)."""
    answer_column: str = "answer"
    """The ground truth the verifier compares with; every other column travels too."""
    completion_column: str = ""
    """SFT (``algorithm.kind = "sft"``): the column holding the target completion; empty:
    the answer column as it is (before ``answer_regex``). It is tokenised on its own and
    followed by the end-of-sequence token, so start it with a space when the prompt
    template ends without one."""
    answer_regex: str = ""
    """A regex searched in the answer column (multi-line) whose first group is the ground
    truth, for answers that carry a worked solution: GSM8K's is ``####\\s*(.+)$``."""
    eval_split: str = ""
    """A named split held out for evaluation (a saved DatasetDict or a Hub dataset)."""
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Or: this seeded share of ``split`` is held out for evaluation."""
    shuffle: bool = True
    """Shuffle the rows with ``task.seed`` (once: index i is the same row after restarts)."""

    @field_validator("answer_regex")
    @classmethod
    def _one_group(cls, v: str) -> str:
        if v:
            import re

            try:
                groups = re.compile(v).groups
            except re.error as exc:
                raise ValueError(f"not a valid regex: {exc}") from None
            if groups < 1:
                raise ValueError("needs a group, (...), around the ground truth")
        return v

    @model_validator(mode="after")
    def _one_eval_source(self) -> DatasetSpec:
        if self.eval_split and self.eval_fraction:
            raise ValueError("task.dataset: set eval_split or eval_fraction, not both")
        return self


class EnvironmentSpec(_Spec):
    name: str = Field(min_length=1)
    """An environment the env service knows (``rlfleet env``: ``tools``, ``retry``, or one
    a package registers under the ``rlfleet.environments`` entry point)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Passed to the environment's reset (e.g. ``max_turns``, ``feedback``)."""
    max_turns: int = Field(default=4, ge=1, le=64)
    """Model turns an episode may take; it ends there (whatever the environment says)."""
    max_total_tokens: int = Field(default=0, ge=0)
    """Tokens an episode's completion may hold, model and environment tokens together; an
    episode that reaches it ends (0: no bound beyond max_turns × sampling.max_new_tokens
    of the model's and what the environment replies)."""


class TaskSpec(_Spec):
    kind: Literal["reasoning_gym", "dataset"] = "reasoning_gym"
    """Where prompts come from: reasoning-gym procedural datasets (offline), or the
    user's own data (``dataset``)."""
    name: str = "basic_arithmetic"
    """The reasoning-gym dataset name (kind reasoning_gym)."""
    dataset: DatasetSpec | None = None
    """kind dataset: the file or directory and its column mapping."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Extra arguments for the dataset (e.g. min_digits, max_digits)."""
    size: int = Field(default=10_000, ge=1, le=10_000_000)
    """Number of distinct prompts (reasoning_gym; a dataset has its rows); steps cycle
    through them."""
    seed: int = 0
    """Dataset seed: reasoning-gym's generator, or a dataset's shuffle and held-out split."""
    prompt_template: str = "{question} Answer:"
    """How a question becomes the prompt text (chat: the user turn); must contain {question}."""
    prompt_format: Literal["template", "chat"] = "template"
    """template: the formatted text is the prompt; chat: it is the user turn of a
    conversation rendered with the model's own chat template (generation prompt open)."""
    system_prompt: str = ""
    """chat: a system turn before the user's (none when empty)."""
    environment: EnvironmentSpec | None = None
    """Multi-turn episodes (``docs/ENVIRONMENTS.md``): each prompt row starts an episode
    in this environment of the env service; the model's turns and the environment's
    replies make one trajectory, the environment's tokens masked from the loss. None:
    single-turn completions scored by ``reward``."""

    @field_validator("name")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from rlfleet.common.tasks import known_task_names

        names = known_task_names()
        if v not in names:
            raise ValueError(
                f"unknown task {v!r}; known tasks include {', '.join(sorted(names)[:8])}, ..."
            )
        return v

    @model_validator(mode="after")
    def _messages_are_chat(self) -> TaskSpec:
        if (
            self.dataset is not None
            and self.dataset.messages_column
            and (self.prompt_format != "chat")
        ):
            raise ValueError(
                "task.dataset.messages_column holds conversations: set task.prompt_format = 'chat'"
            )
        return self

    @model_validator(mode="after")
    def _dataset_needs_its_block(self) -> TaskSpec:
        if self.kind == "dataset" and self.dataset is None:
            raise ValueError("task.dataset is required when task.kind is 'dataset'")
        if self.kind != "dataset" and self.dataset is not None:
            raise ValueError("task.dataset is set but task.kind is not 'dataset'")
        return self

    @field_validator("prompt_template")
    @classmethod
    def _has_question(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("must contain the placeholder {question}")
        return v


VerifierKind = Literal["reasoning_gym", "math", "exact", "regex", "code", "reward_model"]


class RewardTerm(_Spec):
    verifier: VerifierKind
    weight: float = Field(allow_inf_nan=False)
    name: str = ""
    """The term's name in the step metrics (``reward_<name>_mean``; default: its verifier)."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """The verifier's own settings, e.g. {"pattern": ...} for regex, {"extract": "full"}."""


class RewardSpec(_Spec):
    verifier: Literal[VerifierKind, "weighted"] = "reasoning_gym"
    """reasoning_gym: the task's own scorer; math: math-verify; exact / regex: string match;
    code: run the completion's program against the entry's tests in a sandbox;
    reward_model: a sequence-classification reward model's score (settings in ``reward_model``);
    weighted: Σ weight × score over ``terms``."""
    pattern: str = ""
    """For regex: a pattern that a correct completion matches (fullmatch after strip)."""
    terms: list[RewardTerm] = Field(default_factory=list)
    """weighted: the verifiers and their weights, e.g. a format regex at 0.1 and math at 1.0.
    Each term's mean score is a step metric beside reward_mean."""
    reward_model: dict[str, Any] = Field(default_factory=dict)
    """reward_model: the verifier's settings (path, template, normalize, ...)."""

    @model_validator(mode="after")
    def _terms_only_when_weighted(self) -> RewardSpec:
        if self.verifier == "weighted" and not self.terms:
            raise ValueError("reward.terms is required when reward.verifier is 'weighted'")
        if self.verifier != "weighted" and self.terms:
            raise ValueError("reward.terms is set but reward.verifier is not 'weighted'")
        names = [t.name or t.verifier for t in self.terms]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"reward.terms: two terms are named {name!r}; give each a name")
        return self

    @model_validator(mode="after")
    def _regex_needs_pattern(self) -> RewardSpec:
        if self.verifier == "regex":
            import re

            if not self.pattern:
                raise ValueError("reward.pattern is required when reward.verifier is 'regex'")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"reward.pattern is not a valid regex: {exc}") from None
        return self

    @model_validator(mode="after")
    def _reward_model_needs_path(self) -> RewardSpec:
        if self.verifier == "reward_model":
            path = self.reward_model.get("path")
            if not isinstance(path, str) or not path.strip():
                raise ValueError(
                    "reward.reward_model.path is required when reward.verifier is 'reward_model'"
                )
        return self


class SamplingSpec(_Spec):
    temperature: float = Field(default=1.0, ge=0.0, le=5.0)
    """Sampling temperature; 0 is greedy. Ring-1T trains at 1.0."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass; 1.0 disables it."""
    max_new_tokens: int = Field(default=32, ge=1, le=131_072)
    """Longest completion per sample."""


class AlgorithmSpec(_Spec):
    kind: Literal["grpo", "sft"] = "grpo"
    """grpo: RL with group-normalised rewards (GRPO advantages, PPO/IcePop loss).
    sft: supervised fine-tuning on the dataset's (prompt, completion) pairs, loss on the
    completion tokens only; no rollouts, no reward."""
    group_size: int = Field(default=8, ge=2, le=1024)
    """Samples per prompt (grpo)."""
    prompts_per_step: int = Field(default=16, ge=1, le=100_000)
    """Prompts per training step (Ring-1T: 480); sft: examples per step."""
    lr: float = Field(default=1e-5, gt=0.0, le=1.0)
    """AdamW learning rate (Ring-1T: 2e-6)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay of the learning rate over the job's optimizer updates, after the warmup."""
    warmup_steps: int = Field(default=0, ge=0)
    """Steps over which the learning rate rises linearly from lr / W to lr."""
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    """linear / cosine: the rate the decay ends at, as a share of lr."""
    mini_batches: int = Field(default=1, ge=1, le=4096)
    """grpo: optimizer updates per epoch over the step's samples (PPO mini-batches); with
    more than one, later updates see r = π_θ / π_θold ≠ 1 and the clip acts."""
    epochs: int = Field(default=1, ge=1, le=64)
    """grpo: passes over the step's samples (each split into ``mini_batches``)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0)
    """AdamW weight decay."""
    clip_eps: float = Field(default=0.2, gt=0.0, le=1.0)
    """PPO ratio clip ε."""
    kl_coef: float = Field(default=0.0, ge=0.0)
    """γ, coefficient of the KL term against the base policy (Ring-1T: 0)."""
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    """Gradient clipping norm."""
    micro_batch_size: int = Field(default=64, ge=1)
    """Most samples per forward/backward pass (gradient accumulation over the step)."""
    max_tokens_per_micro_batch: int = Field(default=0, ge=0)
    """Most tokens (prompt + completion, padding included) per forward/backward pass, so
    long sequences go a few at a time and short ones many; 0: only ``micro_batch_size``
    bounds a micro-batch. A sequence longer than this is refused, naming it."""
    pack_sequences: bool = False
    """Padding-free micro-batches: their sequences are packed into one row, told apart by
    position ids that restart at each (transformers then keeps attention within each
    sequence: sdpa, eager, flash-attention and flex all read packed position ids), so no
    compute goes to padding; ``max_tokens_per_micro_batch`` then bounds the sum of the
    lengths rather than rows × the longest."""
    cpu_offload: bool = False
    """FSDP2 keeps parameters, gradients and AdamW state in host memory, moving each layer
    to the GPU only while it computes (the optimizer step runs on the CPU): GPU memory for
    activations at the cost of host↔GPU copies every step. It shards even one rank (over a
    process group of one)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping
    them: about one more forward of compute for much less activation memory."""
    logprob_chunk_tokens: int = Field(default=1024, ge=1)
    """Response tokens whose vocabulary-sized logits exist at once in the log-prob pass
    (trainer/logprobs.py): memory is this × vocabulary, not response length × vocabulary."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (GRPO); False keeps only centring."""


class CorrectionSpec(_Spec):
    kind: Literal["icepop", "tis", "none"] = "icepop"
    """Train/inference mismatch correction: IcePop masking, TIS truncation, or none."""
    alpha: float = Field(default=0.5, gt=0.0)
    """IcePop lower bound α on k = p_train / p_infer."""
    beta: float = Field(default=5.0, gt=0.0)
    """IcePop upper bound β."""
    tis_cap: float = Field(default=2.0, gt=0.0)
    """TIS cap C in min(k, C)."""

    @model_validator(mode="after")
    def _band(self) -> CorrectionSpec:
        if self.alpha > self.beta:
            raise ValueError(
                f"correction.alpha ({self.alpha}) must not exceed correction.beta ({self.beta})"
            )
        return self


class SchedulingSpec(_Spec):
    mode: Literal["sync", "c3po"] = "sync"
    """sync: every sequence of a step runs to the end; c3po: C3PO++ token-budget partitioning."""
    token_budget: int = Field(default=4096, gt=0)
    """Φ: tokens of completed trajectories per step (c3po)."""
    pool_capacity: int = Field(default=0, ge=0)
    """Ω: sequences in flight (c3po); 0 means 2 × prompts_per_step × group_size."""
    retention_limit: int = Field(default=2, ge=0)
    """σ: iterations an unfinished rollout may be carried over before it is purged (c3po)."""
    overlap: bool = False
    """c3po only: keep generating while the step trains; replicas load each new version in
    flight, between engine iterations (docs/C3PO.md, "Overlapped rollout")."""
    refill_batch: int = Field(default=0, ge=0)
    """c3po: free slots of Ω to wait for before refilling P with new groups while rollouts
    run (0: a quarter of Ω, at least one group), so replicas prefill new prompts in batches."""
    resume_kv: bool = True
    """c3po: a rollout carried over resumes on the replica that generated it, from the KV
    cache that replica kept at the stop, instead of re-prefilling prompt + prefix under
    the new version (PyTorch engine; vLLM re-prefills). docs/C3PO.md, "Resuming"."""
    max_staleness: int | None = Field(default=None, ge=0)
    """Most policy versions a trained token may lag the version it is trained against;
    groups with an older token are dropped and counted (c3po). None: σ + 1 when
    ``overlap`` is on (a carry-over plus the overlapped step), else no bound beyond σ."""

    @model_validator(mode="after")
    def _overlap_needs_c3po(self) -> SchedulingSpec:
        if self.overlap and self.mode != "c3po":
            raise ValueError(
                "scheduling.overlap runs on top of C3PO++: set scheduling.mode = 'c3po'"
            )
        if self.overlap and self.max_staleness is None:
            self.max_staleness = self.retention_limit + 1
        return self


class CheckpointSpec(_Spec):
    every_steps: int = Field(default=0, ge=0)
    """Write a Hugging Face checkpoint every N steps (0: only at the end)."""
    keep: int = Field(default=2, ge=1)
    """Most recent checkpoints to keep."""


class EvalSpec(_Spec):
    every_steps: int = Field(default=0, ge=0)
    """Evaluate after every N-th step, and always after the last (0: only after the last)."""
    prompts: int = Field(default=64, ge=1, le=100_000)
    """Prompts evaluated: the first N of the eval part (a dataset's eval split or held-out
    fraction; reasoning-gym: a second dataset drawn with seed ``task.seed + 1``)."""
    pass_k: int = Field(default=4, ge=1, le=256)
    """Samples per prompt at the job's sampling temperature for pass@k; 1: greedy only."""
    correct_at: float = Field(default=1.0, allow_inf_nan=False)
    """A sample counts as correct when its reward is at least this."""


class WeightsSpec(_Spec):
    transport: Literal["tcp", "collective"] = "tcp"
    """How a new version reaches the replicas. tcp: each pulls it from weight-sync.
    collective: the trainer also broadcasts it over a process group of the job's
    replicas while it gathers it (``common/weight_group.py``), and weight-sync serves only
    those that missed it (a late joiner, a broken group)."""
    group_backend: Literal["gloo", "nccl"] = "gloo"
    """collective: the group's backend. gloo moves host bytes and runs anywhere; nccl
    needs the trainer and every replica on GPUs of their own (not yet run on a GPU here:
    docs/WEIGHTS.md). A replica whose engine has no GPU refuses an nccl group and takes
    the TCP path."""
    group_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """How long the trainer waits for the replicas to join, or for one broadcast, before it
    gives the group up (the version still reaches them from weight-sync)."""
    publish_in_background: bool = True
    """collective: when the group reaches every replica in use, TrainStep returns once the
    version is broadcast and weight-sync receives it while the next step runs
    (docs/WEIGHTS.md); false: every version reaches weight-sync before TrainStep returns."""

    @model_validator(mode="after")
    def _backend_needs_a_group(self) -> WeightsSpec:
        if self.group_backend != "gloo" and self.transport != "collective":
            raise ValueError(
                f"weights.group_backend {self.group_backend!r} applies to a weight group; "
                'set weights.transport to "collective" or leave group_backend out'
            )
        return self


class ResourcesSpec(_Spec):
    rollout_replicas: int = Field(default=0, ge=0)
    """Rollout replicas to use (0: every registered replica)."""


class JobSpec(_Spec):
    name: str = Field(default="job", min_length=1, max_length=128)
    """A label for people; the job id is assigned by the scheduler."""
    model: ModelSpec
    task: TaskSpec = Field(default_factory=TaskSpec)
    reward: RewardSpec = Field(default_factory=RewardSpec)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    correction: CorrectionSpec = Field(default_factory=CorrectionSpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    weights: WeightsSpec = Field(default_factory=WeightsSpec)
    """How new versions travel to the rollout replicas."""
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    """Experiment trackers of the step metrics: TensorBoard, MLflow, W&B (with its key)."""
    eval: EvalSpec | None = None
    """Evaluation during training (greedy and pass@k with the job's verifier); none: off."""
    steps: int = Field(default=20, ge=1, le=1_000_000)
    """Training steps (policy versions) to run."""
    seed: int = 0
    """Seed of sampling and training."""

    @model_validator(mode="after")
    def _dataset_needs_a_verifier_of_its_own(self) -> JobSpec:
        kinds = {self.reward.verifier, *(t.verifier for t in self.reward.terms)}
        # Episodes are scored by their environment, not by reward.verifier.
        scored = (self.algorithm.kind != "sft" and self.task.environment is None) or (
            self.eval is not None
        )
        if self.task.kind == "dataset" and "reasoning_gym" in kinds and scored:
            raise ValueError(
                "reward.verifier 'reasoning_gym' scores reasoning-gym tasks only; for "
                "task.kind 'dataset' choose math, exact, regex or code"
            )
        return self

    @model_validator(mode="after")
    def _mini_batches_split_the_step(self) -> JobSpec:
        alg = self.algorithm
        if alg.mini_batches > self.samples_per_step and self.scheduling.mode == "sync":
            raise ValueError(
                f"algorithm.mini_batches ({alg.mini_batches}) exceeds the step's samples "
                f"(prompts_per_step × group_size = {self.samples_per_step})"
            )
        if alg.kind == "sft" and (alg.mini_batches > 1 or alg.epochs > 1):
            raise ValueError("algorithm.mini_batches and epochs are for grpo; sft steps once")
        return self

    @model_validator(mode="after")
    def _micro_batch_holds_a_sequence(self) -> JobSpec:
        budget = self.algorithm.max_tokens_per_micro_batch
        if budget and budget <= self.sampling.max_new_tokens:
            raise ValueError(
                f"algorithm.max_tokens_per_micro_batch ({budget}) is shorter than one sequence "
                f"can be: a prompt plus sampling.max_new_tokens ({self.sampling.max_new_tokens})"
            )
        return self

    @model_validator(mode="after")
    def _episodes_run_without_overlap(self) -> JobSpec:
        if self.task.environment is None:
            return self
        if self.algorithm.kind != "grpo":
            raise ValueError("task.environment runs episodes for RL: algorithm.kind must be 'grpo'")
        if self.scheduling.overlap:
            raise ValueError(
                "task.environment runs with scheduling.overlap = false (episodes are carried "
                "over at the stop, not generated while the step trains)"
            )
        return self

    @model_validator(mode="after")
    def _sft_runs_alone(self) -> JobSpec:
        if self.algorithm.kind == "sft" and self.task.kind != "dataset":
            raise ValueError(
                "algorithm.kind 'sft' trains on (prompt, completion) rows of the user's data: "
                "set task.kind = 'dataset'"
            )
        if self.algorithm.kind == "sft" and self.scheduling.mode != "sync":
            raise ValueError(
                "algorithm.kind 'sft' trains on the dataset's completions without rollouts; "
                "scheduling.mode must be 'sync'"
            )
        return self

    @model_validator(mode="after")
    def _eval_needs_an_idle_pool(self) -> JobSpec:
        if self.eval is not None and self.scheduling.overlap:
            raise ValueError(
                "eval runs between steps on idle replicas; scheduling.overlap keeps them "
                "generating, so the two cannot be combined yet"
            )
        data = self.task.dataset
        if (
            self.eval is not None
            and data is not None
            and not (data.eval_split or data.eval_fraction)
        ):
            raise ValueError(
                "eval needs an eval part of the dataset: set task.dataset.eval_split or "
                "task.dataset.eval_fraction"
            )
        return self

    @model_validator(mode="after")
    def _pool_fits_a_group(self) -> JobSpec:
        cap = self.scheduling.pool_capacity
        if self.scheduling.mode == "c3po" and cap and cap < self.algorithm.group_size:
            raise ValueError(
                f"scheduling.pool_capacity ({cap}) is smaller than one group "
                f"(algorithm.group_size = {self.algorithm.group_size})"
            )
        return self

    @property
    def samples_per_step(self) -> int:
        if self.algorithm.kind == "sft":
            return self.algorithm.prompts_per_step
        return self.algorithm.prompts_per_step * self.algorithm.group_size
