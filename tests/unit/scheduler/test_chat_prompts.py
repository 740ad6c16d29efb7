"""Chat prompts (``task.prompt_format = "chat"``): the scheduler builds the prompt tokens
with the model's own chat template (system turn, user turn, generation prompt), the same
for the sync and C3PO++ paths, and refuses a chat job for a model without a template."""

from __future__ import annotations

import json
import shutil

import pytest
from rlfleet.common.errors import InvalidArgument
from rlfleet.common.jobspec import TaskSpec
from rlfleet.common.tasks import PromptSource
from rlfleet.scheduler.c3po.strategy import PromptGroupSource
from rlfleet.scheduler.core import validate_spec
from rlfleet.scheduler.samples import load_codec, make_groups
from tokenizers import Tokenizer

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat-model") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return out


def chat_task(**extra) -> TaskSpec:
    return TaskSpec.model_validate(
        {"name": "basic_arithmetic", "size": 50, "prompt_format": "chat",
         "prompt_template": "{question}", **extra}
    )  # fmt: skip


def test_chat_prompts_are_the_conversation_the_template_renders(chat_model_dir):
    task = chat_task(system_prompt="Answer with a number.")
    prompts = PromptSource(task)
    codec = load_codec(str(chat_model_dir))
    raw = Tokenizer.from_file(str(chat_model_dir / "tokenizer.json"))
    [group] = make_groups(prompts, codec, first_serial=3, count=1, group_size=2)
    question = prompts.get(3)[0]
    text = f"[system] Answer with a number.\n[user] {question}\n[assistant]"
    assert group.prompt_ids == raw.encode(text, add_special_tokens=False).ids
    assert all(list(s.prompt_token_ids) == group.prompt_ids for s in group.sequences)
    # C3PO++ draws the same tokens for the same prompt serial.
    assert PromptGroupSource(prompts, codec, group_size=2).draw(3, step=0).prompt_ids == (
        group.prompt_ids
    )
    # Without a system prompt there is no system turn; "template" keeps the bare text.
    no_system = make_groups(PromptSource(chat_task()), codec, first_serial=3, count=1,
                            group_size=1)[0]  # fmt: skip
    assert no_system.prompt_ids == raw.encode(f"[user] {question}\n[assistant]",
                                              add_special_tokens=False).ids  # fmt: skip
    plain = make_groups(PromptSource(TaskSpec(name="basic_arithmetic", size=50,
                                              prompt_template="{question}")), codec,
                        first_serial=3, count=1, group_size=1)[0]  # fmt: skip
    assert plain.prompt_ids == codec.encode(question)


def test_a_chat_job_for_a_model_without_a_template_is_refused(tiny_model_dir, chat_model_dir):
    spec = {"model": {"path": str(tiny_model_dir)},
            "task": chat_task().model_dump(exclude_none=True)}  # fmt: skip
    with pytest.raises(InvalidArgument, match="has no chat template"):
        validate_spec(json.dumps(spec))
    spec["model"]["path"] = str(chat_model_dir)
    assert validate_spec(json.dumps(spec)).task.prompt_format == "chat"
