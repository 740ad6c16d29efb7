"""Checkpoints in Hugging Face format, written so a crash never fakes a complete one.

Layout: ``<root>/<job_id>/step-<s>/`` holds a Hugging Face model directory
(``config.json``, ``generation_config.json``, ``model.safetensors`` under the
checkpoint names, the tokenizer files copied from the base model directory), so
the folder loads with ``transformers`` or serves with vLLM as is;
``optimizer/``, AdamW's state as a torch.distributed.checkpoint (each rank
writes its own shards, and a job resumes from it on any number of ranks, which
DCP reshards on load); and ``trainer_state.json``. ``model.safetensors`` is the
very payload the step published (``publish.gather_payload``), written as is.
Checkpoints from before DCP hold ``optimizer.pt`` (the whole state) instead; they
still resume.

``step-<s>`` is the state after optimizer step s, i.e. policy version s + 1.
Each checkpoint is written under a hidden temp name and renamed into place in
one ``rename`` — atomic on POSIX — so a directory named ``step-<s>`` is always
complete; leftovers of an interrupted write stay hidden and are removed later.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlfleet.common.weights import Buffer

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_DIR = "optimizer"
LEGACY_OPTIMIZER_FILE = "optimizer.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Files a tokenizer may need; anything else in the model dir (weights, config) is
# rewritten by save_pretrained.
_TOKENIZER_GLOBS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template.*",
    "spiece.model",
    "sentencepiece*.model",
)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    state: dict[str, Any]

    @property
    def version(self) -> int:
        """Policy version held by this checkpoint (optimizer steps taken)."""
        return self.step + 1


class CheckpointStore:
    """The checkpoints of one job."""

    def __init__(self, root: str | Path, job_id: str, *, keep: int):
        self.dir = Path(root) / job_id
        self.keep = max(1, keep)

    def begin(self, step: int) -> Path:
        """A hidden directory for ``step-<step>`` to be written into (``commit`` renames it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".step-{step}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, *, step: int, payload: Buffer, model: torch.nn.Module,
               tokenizer_dir: str | Path, state: dict[str, Any]) -> Path:  # fmt: skip
        """Completes ``tmp`` (whose ``optimizer/`` the ranks wrote) with the weights
        ``payload``, ``model``'s config and generation config, the tokenizer and
        the state; fsyncs it, renames it ``step-<step>``, replacing an older copy, and
        prunes to ``keep``. On any error ``tmp`` is removed."""
        final = self.dir / f"step-{step}"
        try:
            with open(tmp / WEIGHTS_FILE, "wb") as f:
                f.write(memoryview(payload).cast("B"))
            model.config.save_pretrained(tmp)
            generation = getattr(model, "generation_config", None)
            if generation is not None:
                generation.save_pretrained(tmp)
            copy_tokenizer_files(tokenizer_dir, tmp)
            payload_state = {"step": step, "version": step + 1, "saved_at": time.time(), **state}
            (tmp / STATE_FILE).write_text(json.dumps(payload_state, indent=2, default=str))
            _fsync_tree(tmp)
            if final.exists():  # the same step trained again after a restart
                old = self.dir / f".step-{step}.old-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, final)
            _fsync_dir(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return final

    def checkpoints(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for child in self.dir.iterdir():
            match = _STEP_DIR.match(child.name)
            if not match or not (child / STATE_FILE).is_file():
                continue
            try:
                state = json.loads((child / STATE_FILE).read_text())
            except (OSError, json.JSONDecodeError):
                logger.warning(
                    "skipping checkpoint with unreadable state", extra={"path": str(child)}
                )
                continue
            out.append(CheckpointInfo(child, int(match.group(1)), state))
        return sorted(out, key=lambda c: c.step)

    def latest(self) -> CheckpointInfo | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def prune(self) -> None:
        """Keeps the newest ``keep`` checkpoints; removes leftovers of interrupted writes."""
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old.path, ignore_errors=True)
        self.remove_partial()

    def remove_partial(self) -> None:
        if not self.dir.is_dir():
            return
        for child in self.dir.iterdir():
            if child.name.startswith(".step-"):
                shutil.rmtree(child, ignore_errors=True)

    @staticmethod
    def legacy_optimizer_state(info: CheckpointInfo) -> dict[str, Any] | None:
        """The whole AdamW state of a checkpoint written before DCP (``optimizer.pt``),
        or None when there is none."""
        path = info.path / LEGACY_OPTIMIZER_FILE
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    src, dst = Path(src), Path(dst)
    copied = []
    for pattern in _TOKENIZER_GLOBS:
        for f in src.glob(pattern):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_dir():
            _fsync_tree(f)
        elif f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
