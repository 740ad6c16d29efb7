"""API tokens of the REST API: bearer tokens checked against stored sha256 hashes.

The server never holds a token in clear, only its hash, so a leaked tokens file
or environment does not leak a credential. Two sources, merged:

- a tokens file, one token per line: ``<sha256 hex> [role] [label ...]``, ``#``
  starts a comment; it is re-read when it changes, so tokens rotate without a
  restart;
- the environment variable ``RLFLEET_API_TOKENS``: entries ``<sha256 hex>[:role]``
  separated by commas or whitespace (handy for a Kubernetes Secret).

Roles: ``read`` may only look (GET); ``write`` (the default) may also submit and
cancel jobs. ``rlfleet token create`` prints a new token and the line to store.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TOKENS_ENV = "RLFLEET_API_TOKENS"
TOKEN_PREFIX = "rlf_"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Role(enum.StrEnum):
    READ = "read"
    WRITE = "write"

    def allows(self, needed: Role) -> bool:
        """write may do everything read may."""
        return self is Role.WRITE or needed is Role.READ


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's role and its label (for logs)."""

    role: Role
    label: str = ""


def hash_token(token: str) -> str:
    """The sha256 hex digest stored for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random API token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _parse_role(text: str, where: str) -> Role:
    try:
        return Role(text.lower())
    except ValueError:
        known = ", ".join(r.value for r in Role)
        raise ValueError(f"{where}: role {text!r} is not one of {known}") from None


def _check_hash(text: str, where: str) -> str:
    digest = text.lower()
    if not _HEX64.match(digest):
        raise ValueError(
            f"{where}: {text[:12]!r}... is not a sha256 hex digest (64 hex characters); "
            "store the hash that `rlfleet token create` prints, not the token"
        )
    return digest


def parse_tokens_file(text: str, *, source: str = "tokens file") -> dict[str, Principal]:
    """Hash -> principal for every line of a tokens file; ValueError naming a bad line."""
    out: dict[str, Principal] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}"
        parts = line.split()
        digest = _check_hash(parts[0], where)
        role = _parse_role(parts[1], where) if len(parts) > 1 else Role.WRITE
        out[digest] = Principal(role=role, label=" ".join(parts[2:]) or f"{source}:{number}")
    return out


def parse_tokens_env(text: str) -> dict[str, Principal]:
    """Hash -> principal for ``RLFLEET_API_TOKENS`` (``hash[:role]``, comma/space separated)."""
    out: dict[str, Principal] = {}
    for index, entry in enumerate(re.split(r"[,\s]+", text.strip())):
        if not entry:
            continue
        where = f"{TOKENS_ENV} entry {index + 1}"
        digest, _, role = entry.partition(":")
        out[_check_hash(digest, where)] = Principal(
            role=_parse_role(role, where) if role else Role.WRITE, label=f"env:{index + 1}"
        )
    return out


class TokenTable:
    """Looks up a presented token; re-reads the tokens file when its mtime changes."""

    def __init__(self, *, tokens_file: str | Path | None = None, env_value: str = ""):
        self.path = Path(tokens_file) if tokens_file else None
        self._env = parse_tokens_env(env_value) if env_value else {}
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._file: dict[str, Principal] = {}
        if self.path is not None:
            if not self.path.is_file():
                raise ValueError(f"api tokens file {self.path} does not exist")
            self._reload()
        if not self._env and not self._file:
            raise ValueError(
                f"no API tokens configured: put hashes in the tokens file or in {TOKENS_ENV} "
                "(`rlfleet token create` makes one)"
            )

    @classmethod
    def from_environment(cls, tokens_file: str | Path | None = None) -> TokenTable:
        return cls(tokens_file=tokens_file, env_value=os.environ.get(TOKENS_ENV, ""))

    def _reload(self) -> None:
        assert self.path is not None
        mtime = self.path.stat().st_mtime
        if mtime == self._mtime:
            return
        self._file = parse_tokens_file(self.path.read_text(), source=str(self.path))
        self._mtime = mtime
        logger.info("loaded %d API token hashes from %s", len(self._file), self.path)

    def _maybe_reload(self) -> None:
        if self.path is None:
            return
        with self._lock:
            try:
                self._reload()
            except (OSError, ValueError) as exc:
                # Keep serving with the tokens we had; a half-written file must not lock everyone out.
                logger.error("could not re-read the API tokens file; keeping the old one: %s", exc)

    def lookup(self, token: str) -> Principal | None:
        """The principal of ``token``, or None if it is not a known token."""
        if not token:
            return None
        self._maybe_reload()
        digest = hash_token(token)
        return self._file.get(digest) or self._env.get(digest)

    def __len__(self) -> int:
        return len(self._file) + len(self._env)
