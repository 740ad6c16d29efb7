"""Downloads a model into the model volume, once: the init container of the pods that read it
(the rlfleet chart's `model.source` hub or s3). Runs on the rlfleet image's Python.

hub  huggingface_hub's ``snapshot_download`` (it comes with transformers) into ``--dest``;
     HF_TOKEN from the environment for private or gated repositories, HF_ENDPOINT for a mirror.
s3   every object under ``--prefix``, listed with ListObjectsV2 and fetched with GetObject,
     signed with AWS Signature Version 4 by the standard library: the image has no boto3.
     Static credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and
     AWS_SESSION_TOKEN when set); none: unsigned requests, for a public bucket.

Once: a marker file (``.rlfleet-model.json``) is written after the last file, naming the
source; a volume that holds it is not downloaded again (a restarted pod, the next pod, the
next release). Several pods may share the volume (a ReadWriteMany claim): the first takes a
lock (a directory made with mkdir, atomic on network filesystems too) and downloads, the
others wait for the marker. The holder refreshes the lock's time while it works; a lock left
alone for ``--stale-s`` seconds (its pod was killed) is taken over, and the download goes on
from the files already there (huggingface_hub skips finished files; S3 objects whose size
matches are kept).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import json
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

MARKER = ".rlfleet-model.json"
LOCK = ".rlfleet-download.lock"
# What a service reads besides the weights (the scheduler only needs the tokenizer).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def log(message: str) -> None:
    print(f"fetch-model: {message}", file=sys.stderr, flush=True)


# -- once per volume ----------------------------------------------------------------------


def identity(args: argparse.Namespace) -> dict:
    """What the marker must name for a copy to count as this one."""
    if args.source == "hub":
        return {"source": "hub", "repo": args.repo, "revision": args.revision,
                "ignore": sorted(args.ignore)}  # fmt: skip
    return {"source": "s3", "endpoint": args.endpoint or "", "bucket": args.bucket,
            "prefix": args.prefix}  # fmt: skip


def complete(dest: Path, ident: dict, *, metadata_only: bool) -> bool:
    """A copy of this source is there: whole, or (for metadata_only) at least its metadata."""
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("identity") != ident:
        return False
    return metadata_only or not marker.get("metadata_only", False)


def write_marker(dest: Path, ident: dict, *, metadata_only: bool, files: int) -> None:
    tmp = dest / f"{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"identity": ident, "metadata_only": metadata_only,
                               "files": files, "finished_at": time.time()}))  # fmt: skip
    os.replace(tmp, dest / MARKER)


class Lock:
    """An mkdir lock with a heartbeat: the holder touches it every ``stale_s / 5`` seconds."""

    def __init__(self, path: Path, stale_s: float):
        self.path = path
        self.stale_s = stale_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_take(self) -> bool:
        try:
            self.path.mkdir()
        except FileExistsError:
            if self._stale():
                self._break()
            return False
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return True

    def _stale(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        return age > self.stale_s

    def _break(self) -> None:
        """Moves a stale lock aside (rename is atomic: one waiter wins) and removes it."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{time.time_ns()}")
        try:
            os.rename(self.path, aside)
        except OSError:
            return  # another waiter broke it first, or its holder just refreshed it
        log(f"took over a download lock left for more than {self.stale_s:.0f} s")
        shutil.rmtree(aside, ignore_errors=True)

    def _beat(self) -> None:
        while not self._stop.wait(max(1.0, self.stale_s / 5)):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        shutil.rmtree(self.path, ignore_errors=True)


def fetch_once(args: argparse.Namespace, download) -> str:
    """Runs ``download(dest)`` unless the copy is complete, with one downloader per volume.
    Returns what happened: "present", "downloaded" or "waited"."""
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    ident = identity(args)
    if complete(dest, ident, metadata_only=args.metadata_only):
        log(f"{dest} already holds {ident}: nothing to download")
        return "present"
    lock = Lock(dest / LOCK, args.stale_s)
    waited = False
    while not lock.try_take():
        if not waited:
            log(f"another pod is downloading into {dest}; waiting for it")
            waited = True
        time.sleep(args.poll_s)
        if complete(dest, ident, metadata_only=args.metadata_only):
            log(f"{dest} is complete")
            return "waited"
    try:
        if complete(dest, ident, metadata_only=args.metadata_only):  # finished meanwhile
            return "waited" if waited else "present"
        start = time.monotonic()
        files = download(dest)
        write_marker(dest, ident, metadata_only=args.metadata_only, files=files)
        log(f"downloaded {files} files into {dest} in {time.monotonic() - start:.0f} s")
        return "downloaded"
    finally:
        lock.release()


# -- Hugging Face Hub ---------------------------------------------------------------------


def hub_download(args: argparse.Namespace):
    def download(dest: Path) -> int:
        from huggingface_hub import snapshot_download

        ignore = list(args.ignore)
        if args.metadata_only:
            ignore += [f"*{s}" for s in WEIGHT_SUFFIXES]
        log(f"downloading {args.repo}@{args.revision} from the Hub into {dest}")
        snapshot_download(
            repo_id=args.repo,
            revision=args.revision,
            local_dir=str(dest),
            ignore_patterns=ignore or None,
            max_workers=args.workers,
        )  # the token: HF_TOKEN from the environment
        return sum(1 for p in dest.rglob("*") if p.is_file() and ".cache" not in p.parts)

    return download


# -- S3 (Signature Version 4, standard library only) ---------------------------------------


def _quote(value: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(value, safe=safe)


def sign_v4(*, method: str, host: str, path: str, query: dict[str, str], headers: dict[str, str],
            payload_sha256: str, access_key: str, secret_key: str, region: str,
            amz_date: str, service: str = "s3") -> str:  # fmt: skip
    """The Authorization header of an AWS Signature Version 4 request. ``headers`` are the
    ones to sign besides host (x-amz-date and x-amz-content-sha256 among them); ``path`` is
    the raw (unencoded) object path."""
    date = amz_date[:8]
    signed = {"host": host, **{k.lower(): v.strip() for k, v in headers.items()}}
    names = sorted(signed)
    canonical = "\n".join([
        method,
        _quote(path, safe="/-_.~"),
        "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items())),
        "".join(f"{n}:{signed[n]}\n" for n in names),
        ";".join(names),
        payload_sha256,
    ])  # fmt: skip
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])  # fmt: skip
    key = f"AWS4{secret_key}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}")  # fmt: skip


class S3:
    def __init__(self, *, bucket: str, region: str, endpoint: str = "", path_style: bool = False,
                 access_key: str = "", secret_key: str = "", session_token: str = "",
                 timeout_s: float = 60.0, retries: int = 5):  # fmt: skip
        url = urllib.parse.urlsplit(endpoint or f"https://s3.{region}.amazonaws.com")
        self.scheme, self.netloc = url.scheme, url.netloc
        self.bucket, self.region, self.path_style = bucket, region, path_style
        self.access_key, self.secret_key, self.session_token = access_key, secret_key, session_token
        self.timeout_s, self.retries = timeout_s, retries

    def _request(self, key: str, query: dict[str, str]):
        host = self.netloc if self.path_style else f"{self.bucket}.{self.netloc}"
        path = f"/{self.bucket}/{key}" if self.path_style else f"/{key}"
        url = f"{self.scheme}://{host}{_quote(path, safe='/-_.~')}"
        if query:
            url += "?" + "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))
        headers: dict[str, str] = {}
        if self.access_key:
            amz_date = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
            headers = {"x-amz-date": amz_date, "x-amz-content-sha256": EMPTY_SHA256}
            if self.session_token:
                headers["x-amz-security-token"] = self.session_token
            headers["Authorization"] = sign_v4(
                method="GET", host=host, path=path, query=query, headers=headers,
                payload_sha256=EMPTY_SHA256, access_key=self.access_key,
                secret_key=self.secret_key, region=self.region, amz_date=amz_date,
            )  # fmt: skip
        return urllib.request.Request(url, headers=headers, method="GET")

    def _open(self, key: str, query: dict[str, str]):
        for attempt in range(self.retries):
            try:  # signed again each time: a signature is valid for 15 minutes
                return urllib.request.urlopen(self._request(key, query), timeout=self.timeout_s)
            except urllib.error.HTTPError as exc:
                body = exc.read()[:500].decode(errors="replace")
                if (exc.code < 500 and exc.code != 429) or attempt == self.retries - 1:
                    raise SystemExit(f"fetch-model: S3 GET {key or '/'} failed: "
                                     f"HTTP {exc.code} {body}") from None  # fmt: skip
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt == self.retries - 1:
                    raise SystemExit(f"fetch-model: S3 GET {key or '/'} failed: {exc}") from None
            time.sleep(min(30.0, 2.0**attempt))
        raise AssertionError("unreachable")

    def list(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under ``prefix``."""
        out: list[tuple[str, int]] = []
        token = ""
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            with self._open("", query) as resp:
                root = ET.fromstring(resp.read())
            for item in root.iter(f"{S3_NS}Contents"):
                out.append((item.findtext(f"{S3_NS}Key"), int(item.findtext(f"{S3_NS}Size"))))
            if root.findtext(f"{S3_NS}IsTruncated") != "true":
                return out
            token = root.findtext(f"{S3_NS}NextContinuationToken") or ""

    def get(self, key: str, dest: Path) -> None:
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        with self._open(key, {}) as resp, open(tmp, "wb") as f:
            shutil.copyfileobj(resp, f, 8 << 20)
        os.replace(tmp, dest)


def s3_download(args: argparse.Namespace):
    def download(dest: Path) -> int:
        s3 = S3(
            bucket=args.bucket, region=args.region, endpoint=args.endpoint,
            path_style=args.path_style,
            access_key=os.environ.get("AWS_ACCESS_KEY_ID", ""),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
            session_token=os.environ.get("AWS_SESSION_TOKEN", ""),
        )  # fmt: skip
        prefix = args.prefix.strip("/")
        prefix = f"{prefix}/" if prefix else ""
        objects = [(k, n) for k, n in s3.list(prefix) if not k.endswith("/")]
        if not objects:
            raise SystemExit(f"fetch-model: no objects under s3://{args.bucket}/{prefix}")
        root = dest.resolve()
        done = 0
        for key, size in objects:
            rel = key[len(prefix) :]
            if args.metadata_only and rel.endswith(WEIGHT_SUFFIXES):
                continue
            target = (dest / rel).resolve()
            if root not in target.parents:
                raise SystemExit(f"fetch-model: refusing object {key!r}: it leaves {dest}")
            if target.is_file() and target.stat().st_size == size:
                done += 1  # finished by an earlier attempt
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            log(f"s3://{args.bucket}/{key} ({size / 2**20:.1f} MiB)")
            s3.get(key, target)
            done += 1
        return done

    return download


# -- entry ---------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", choices=["hub", "s3"], required=True)
    ap.add_argument("--dest", required=True, help="model directory to fill")
    ap.add_argument("--metadata-only", action="store_true",
                    help="config and tokenizer files only, no weights")  # fmt: skip
    ap.add_argument("--stale-s", type=float, default=300.0,
                    help="seconds before an unrefreshed lock is taken over")  # fmt: skip
    ap.add_argument("--poll-s", type=float, default=5.0, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=8, help="parallel Hub downloads")
    ap.add_argument("--repo", default="")
    ap.add_argument("--revision", default="main")
    ap.add_argument("--ignore", action="append", default=[], help="glob of Hub files to skip")
    ap.add_argument("--bucket", default="")
    ap.add_argument("--prefix", default="")
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--endpoint", default="")
    ap.add_argument("--path-style", action="store_true")
    args = ap.parse_args(argv)
    if args.source == "hub" and not args.repo:
        ap.error("--source hub needs --repo")
    if args.source == "s3" and not args.bucket:
        ap.error("--source s3 needs --bucket")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    download = hub_download(args) if args.source == "hub" else s3_download(args)
    fetch_once(args, download)
    return 0


if __name__ == "__main__":
    sys.exit(main())
