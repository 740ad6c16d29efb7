"""TLS for gRPC and secrets from the environment or mounted files.

Why it is shaped this way
- Off by default: on loopback (the local launcher, tests) every service talks
  plaintext. Setting ``tls_cert_file`` + ``tls_key_file`` makes a service's gRPC
  server accept TLS only; setting ``tls_ca_file`` makes its gRPC clients (to
  the other services) use TLS and verify servers against that CA;
  ``tls_client_auth`` turns both into mutual TLS. Each service reads these from
  its own settings (``RLFLEET_<SERVICE>_TLS_*`` or ``--tls-*`` flags), so a
  Helm chart mounts one Secret with ``tls.crt``/``tls.key``/``ca.crt`` and points
  every service at it.
- Clients are made in many places (``grpc_client.make_channel``); rather than
  thread credentials through each, ``load_config`` records the process's client
  TLS once (``set_client_tls``) and ``make_channel`` uses it unless told
  otherwise.
- Secrets (Redis password, API tokens) come from a value or from a file, the
  file winning: Kubernetes and Docker mount secrets as files, and a file keeps
  the secret out of ``ps`` and of the environment that child processes inherit.
  Secret values are pydantic ``SecretStr`` so a settings repr never shows them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import grpc
from pydantic import SecretStr

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one process; any may be empty."""

    cert_file: str = ""
    """This process's certificate (server side; client side too under mutual TLS)."""
    key_file: str = ""
    """Private key of ``cert_file``."""
    ca_file: str = ""
    """CA bundle that peers' certificates are checked against."""
    client_auth: bool = False
    """Mutual TLS: servers require, and clients present, certificates signed by the CA."""
    server_name: str = ""
    """Name clients expect in server certificates instead of the address's host."""

    @property
    def serves_tls(self) -> bool:
        return bool(self.cert_file and self.key_file)

    @property
    def dials_tls(self) -> bool:
        return bool(self.ca_file)

    def check(self) -> None:
        """Raises ValueError with a sentence naming the setting that is wrong."""
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("set tls_cert_file and tls_key_file together (or neither)")
        if self.client_auth and not (self.ca_file and self.serves_tls):
            raise ValueError("tls_client_auth needs tls_ca_file, tls_cert_file and tls_key_file")
        for name, path in (
            ("tls_cert_file", self.cert_file),
            ("tls_key_file", self.key_file),
            ("tls_ca_file", self.ca_file),
        ):
            if path and not Path(path).is_file():
                raise ValueError(f"{name} {path!r} is not a readable file")


def tls_of(config) -> TlsFiles:
    """The TLS settings of a ``ServiceConfig`` (or anything with the same fields)."""
    return TlsFiles(
        cert_file=getattr(config, "tls_cert_file", ""),
        key_file=getattr(config, "tls_key_file", ""),
        ca_file=getattr(config, "tls_ca_file", ""),
        client_auth=getattr(config, "tls_client_auth", False),
        server_name=getattr(config, "tls_server_name", ""),
    )


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials | None:
    """Credentials for ``add_secure_port``, or None to serve plaintext."""
    if not tls.serves_tls:
        return None
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file), _read(tls.cert_file))],
        root_certificates=_read(tls.ca_file) if tls.client_auth else None,
        require_client_auth=tls.client_auth,
    )


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials | None:
    """Credentials for ``secure_channel``, or None to dial plaintext."""
    if not tls.dials_tls:
        return None
    key = chain = None
    if tls.client_auth:
        key, chain = _read(tls.key_file), _read(tls.cert_file)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file), private_key=key, certificate_chain=chain
    )


def channel_options(tls: TlsFiles) -> list[tuple[str, str]]:
    if tls.dials_tls and tls.server_name:
        return [("grpc.ssl_target_name_override", tls.server_name)]
    return []


_client_tls = TlsFiles()
_client_lock = threading.Lock()


def set_client_tls(tls: TlsFiles) -> None:
    """What ``make_channel`` uses in this process unless a caller passes its own."""
    global _client_tls
    with _client_lock:
        _client_tls = tls


def client_tls() -> TlsFiles:
    with _client_lock:
        return _client_tls


# -- secrets -------------------------------------------------------------------


def resolve_secret(value: SecretStr | str = "", file: str = "", *, name: str = "secret") -> str:
    """The secret from ``file`` (stripped of its trailing newline) if set, else ``value``.

    Raises ValueError naming the setting when the file cannot be read; the
    message never contains the secret.
    """
    if file:
        try:
            return Path(file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"{name}_file {file!r} cannot be read: {exc.strerror}") from None
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return value or ""


def with_redis_password(url: str, password: str) -> str:
    """``url`` with ``password`` as its credential (replacing one already there)."""
    if not password:
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"redis_url has scheme {parts.scheme!r}; expected redis:// or rediss://")
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{quote(parts.username or '', safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and fleet.json."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{netloc}", parts.path, parts.query, ""))
