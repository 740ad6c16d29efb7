"""How the CLI finds and talks to the scheduler's REST API (through the SDK).

URL: --url > $RLFLEET_URL > the fleet.json that `rlfleet up` wrote > the SDK's
default (http://127.0.0.1:8080). Token: --token > $RLFLEET_TOKEN.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from rlfleet_client import ApiError, RlfleetClient, Unauthorized, Unreachable
from rlfleet_client.client import DEFAULT_URL


def resolve_url(explicit: str | None, run_dir: Path) -> str:
    if explicit:
        return explicit
    if os.environ.get("RLFLEET_URL"):
        return os.environ["RLFLEET_URL"]
    fleet_file = run_dir / "fleet.json"
    if fleet_file.is_file():
        with contextlib.suppress(ValueError, KeyError):
            return json.loads(fleet_file.read_text())["url"]
    return DEFAULT_URL


def make_client(url: str | None, token: str | None, run_dir: Path) -> RlfleetClient:
    return RlfleetClient(resolve_url(url, run_dir), token=token)


@contextlib.contextmanager
def api_errors(client: RlfleetClient) -> Iterator[None]:
    """Turns SDK errors into a one-line ``error: ...`` exit (status 1), never a traceback."""
    try:
        yield
    except Unreachable as exc:
        raise SystemExit(
            f"error: {exc.message}\n"
            "  start a local fleet with `rlfleet up`, or pass --url / set RLFLEET_URL"
        ) from None
    except Unauthorized as exc:
        raise SystemExit(f"error: {exc.message} (pass --token or set RLFLEET_TOKEN)") from None
    except ApiError as exc:
        raise SystemExit(f"error: {exc.message}") from None
