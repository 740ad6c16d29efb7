"""The SDK: a thin, typed layer over the REST API.

Reads (GET) are retried on connection errors, 429 and 5xx with backoff; writes
are not, except submit, which always sends an idempotency key that the server
deduplicates. ``events`` follows a job over server-sent events and reconnects
(resuming after the last step it saw) when the stream drops, e.g. while the
scheduler restarts.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from rlfleet_client.errors import ApiError, Unreachable, error_for
from rlfleet_client.models import Checkpoint, Event, Job, JobPage, StepRecord

DEFAULT_URL = "http://127.0.0.1:8080"


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, ApiError) and (exc.status_code >= 500 or exc.status_code == 429)


class RlfleetClient:
    """Client of one rlfleet scheduler's REST API.

    ``base_url`` defaults to $RLFLEET_URL, ``token`` to $RLFLEET_TOKEN.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        verify: bool | str = True,
    ):
        self.base_url = (base_url or os.environ.get("RLFLEET_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("RLFLEET_TOKEN", "")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, verify=verify
        )
        self._retries = max(1, retries)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RlfleetClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------

    @staticmethod
    def _check(resp: httpx.Response) -> Any:
        if resp.is_success:
            return resp.json() if resp.content else None
        errors: list[dict[str, Any]] = []
        try:
            body = resp.json()
            detail = body.get("detail", resp.text)
            errors = [e for e in body.get("errors", []) if isinstance(e, dict)]
        except (ValueError, AttributeError):
            detail = resp.text or resp.reason_phrase
        if not isinstance(detail, str):
            detail = json.dumps(detail)
        raise error_for(resp.status_code, detail, errors)

    def _unreachable(self, exc: httpx.TransportError) -> Unreachable:
        reason = str(exc) or type(exc).__name__
        return Unreachable(0, f"cannot reach the rlfleet API at {self.base_url}: {reason}")

    def _request(self, method: str, path: str, *, retry: bool, **kwargs) -> Any:
        try:
            if not retry:
                return self._check(self._http.request(method, path, **kwargs))
            for attempt in Retrying(
                retry=retry_if_exception(_retryable),
                stop=stop_after_attempt(self._retries),
                wait=wait_random_exponential(multiplier=0.2, max=3.0),
                reraise=True,
            ):
                with attempt:
                    return self._check(self._http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        raise AssertionError("unreachable")

    # -- jobs ---------------------------------------------------------------------

    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Submits a job spec. With an idempotency key (one is made if omitted) a
        retried submit returns the same job instead of creating a second one."""
        key = idempotency_key or uuid.uuid4().hex
        data = self._request(
            "POST", "/v1/jobs", json=spec, headers={"Idempotency-Key": key}, retry=True
        )
        return Job.model_validate(data)

    def list_jobs(
        self, *, state: str | None = None, page_size: int = 50, page_token: str = ""
    ) -> JobPage:
        params: dict[str, Any] = {"page_size": page_size}
        if state:
            params["state"] = state
        if page_token:
            params["page_token"] = page_token
        return JobPage.model_validate(self._request("GET", "/v1/jobs", params=params, retry=True))

    def iter_jobs(self, *, state: str | None = None, page_size: int = 50) -> Iterator[Job]:
        token = ""
        while True:
            page = self.list_jobs(state=state, page_size=page_size, page_token=token)
            yield from page.jobs
            if not page.next_page_token:
                return
            token = page.next_page_token

    def get_job(self, job_id: str) -> Job:
        return Job.model_validate(self._request("GET", f"/v1/jobs/{job_id}", retry=True))

    def steps(self, job_id: str, *, since_step: int = 0, page_size: int = 1000) -> list[StepRecord]:
        """Every recorded step from ``since_step`` on, fetched a page at a time."""
        out: list[StepRecord] = []
        start: int | None = since_step
        while start is not None:
            data = self._request(
                "GET",
                f"/v1/jobs/{job_id}/steps",
                params={"since_step": start, "limit": page_size},
                retry=True,
            )
            out += [StepRecord.model_validate(s) for s in data["steps"]]
            start = data.get("next_since_step")
        return out

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        data = self._request("GET", f"/v1/jobs/{job_id}/checkpoints", retry=True)
        return [Checkpoint.model_validate(c) for c in data["checkpoints"]]

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._request("POST", f"/v1/jobs/{job_id}:cancel", retry=False))

    def ready(self) -> bool:
        """Whether the scheduler is ready (/readyz: Redis reachable, job worker running)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    # -- following ----------------------------------------------------------------

    def _events_once(self, job_id: str, *, since_step: int, read_timeout: float) -> Iterator[Event]:
        with self._http.stream(
            "GET",
            f"/v1/jobs/{job_id}/events",
            params={"since_step": since_step},
            timeout=httpx.Timeout(read_timeout, connect=10.0),
        ) as resp:
            if not resp.is_success:
                resp.read()
                self._check(resp)
            event, data = "message", []
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield Event(event=event, data=json.loads("\n".join(data)))
                    event, data = "message", []

    def events(
        self,
        job_id: str,
        *,
        since_step: int = 0,
        reconnect_for: float = 60.0,
        read_timeout: float = 60.0,
    ) -> Iterator[Event]:
        """Server-sent events of a job: a "state" event, a "step" event per step
        (from ``since_step``), "state" on every change and "end" once the job is finished.

        If the stream drops before "end" (a scheduler restart, a network blip) it
        reconnects, resuming after the last step seen, for up to ``reconnect_for``
        seconds of failed attempts; then (or at once with 0) it raises Unreachable.
        The server sends a keep-alive every 15 s, so ``read_timeout`` detects a dead link.
        """
        next_step = since_step
        down_since: float | None = None
        delay = 0.2
        while True:
            try:
                for ev in self._events_once(
                    job_id, since_step=next_step, read_timeout=read_timeout
                ):
                    down_since, delay = None, 0.2
                    if ev.event == "step":
                        next_step = int(ev.data["step"]) + 1
                    yield ev
                    if ev.event == "end":
                        return
                reason = "the event stream closed before the job ended"
            except httpx.TransportError as exc:
                reason = str(self._unreachable(exc))
            except ApiError as exc:
                if exc.status_code < 500:
                    raise
                reason = exc.message
            now = time.monotonic()
            down_since = down_since if down_since is not None else now
            if now - down_since >= reconnect_for:
                raise Unreachable(0, f"lost the event stream of job {job_id}: {reason}")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def wait(self, job_id: str, *, timeout: float = 3600.0, poll_s: float = 1.0) -> Job:
        """Polls until the job is finished (or ``timeout`` passes)."""
        end = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job.done or time.monotonic() > end:
                return job
            time.sleep(poll_s)
