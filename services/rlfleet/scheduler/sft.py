"""SFT steps (``algorithm.kind = "sft"``): demonstrations instead of rollouts.

Step s takes dataset rows s·P .. s·P + P − 1 (P = ``algorithm.prompts_per_step``; the
seeded shuffle makes row i the same after any restart) and turns each into a sample:
the prompt tokens exactly as an RL job would send them (template or chat), the
row's completion as the target tokens (``TextCodec.completion_ids``), cut at
``sampling.max_new_tokens``. A transcript (an agent's demonstration: tool turns or several
assistant turns) is learned whole: every assistant turn, with the tool results and user
turns between them masked from the loss (``chat.chat_transcript_ids``), as a multi-turn
episode's are. The step loop hands them to the reward service's
``Write`` (no score) so they reach the trainer through the same buffer, with the
same idempotency and acknowledgement as RL experience; the trainer's SFT update
puts the loss on the completion tokens only. The replicas still load every new
version, so ``eval`` scores the SFT policy and a later job starts from it warm.
"""

from __future__ import annotations

from rlfleet.common.errors import InvalidArgument
from rlfleet.common.tasks import entry_to_json
from rlfleet.scheduler.samples import group_id, sample_id
from rlfleet.scheduler.strategy import RolloutResult, RolloutStrategy, StepContext
from rlfleet.v1 import common_pb2


class SftStrategy(RolloutStrategy):
    """Builds a step's samples from the dataset's (prompt, completion) rows."""

    def rollout(self, ctx: StepContext) -> RolloutResult:
        per_step = ctx.spec.algorithm.prompts_per_step
        limit = ctx.spec.sampling.max_new_tokens
        samples = []
        for serial in range(ctx.step * per_step, (ctx.step + 1) * per_step):
            text, entry = ctx.prompts.get(serial)
            mask: list[bool] = []
            prompt_ids = None
            if "transcript" in entry:  # an agent's demonstration: every assistant turn
                from rlfleet.scheduler.chat import chat_prompt_ids, chat_tools, chat_transcript_ids

                # The row's tool schemas go to the template, prompt and transcript alike, as
                # an episode's prompt has its environment's.
                tools = chat_tools(entry.get("tools"))
                model, system = ctx.spec.model.path, ctx.spec.task.system_prompt
                target, mask = chat_transcript_ids(model, text, entry["transcript"], system, tools)
                prompt_ids = chat_prompt_ids(model, text, system, tools)
                target, mask = target[:limit], mask[:limit]
                completion = "".join(m["content"] for m in entry["transcript"])
            else:
                try:
                    completion = ctx.prompts.completion(serial)
                except ValueError as exc:
                    raise InvalidArgument(str(exc)) from None
                target = ctx.codec.completion_ids(text, completion, ctx.spec.task)[:limit]
            samples.append(
                common_pb2.Sample(
                    job_id=ctx.job_id,
                    sample_id=sample_id(serial, 0),
                    group_id=group_id(serial),
                    step=ctx.step,
                    prompt_token_ids=prompt_ids or ctx.codec.prompt_ids(text, ctx.spec.task),
                    completion_token_ids=target,
                    # Demonstrations were not sampled: no inference log-probs to correct.
                    inference_logprobs=[0.0] * len(target),
                    token_versions=[ctx.version] * len(target),
                    loss_mask=mask,
                    finish_reason="stop",
                    completion_text=completion,
                    task_json=entry_to_json(entry),
                )
            )
        lengths = [len(s.completion_token_ids) for s in samples]
        return RolloutResult(
            samples,
            {
                "tokens_demonstrated": float(sum(lengths)),
                "response_length_mean": sum(lengths) / len(lengths),
                "response_length_max": float(max(lengths)),
            },
        )
