"""Service configuration: defaults < TOML file < environment < CLI flags.

Every service has a ``pydantic-settings`` model derived from ``ServiceConfig``.
``load_config`` reads ``--config FILE.toml`` and ``--field value`` flags (field
names with dashes or underscores), and ``RLFLEET_<SERVICE>_<FIELD>`` variables.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

T = TypeVar("T", bound="ServiceConfig")


class _TomlSource(PydanticBaseSettingsSource):
    """Values from the TOML file named by ``--config`` (lower priority than env)."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]):
        super().__init__(settings_cls)
        self.data = data

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


class ServiceConfig(BaseSettings):
    """Settings every service process shares."""

    model_config = SettingsConfigDict(
        extra="forbid", env_nested_delimiter="__", use_attribute_docstrings=True
    )
    service_name: ClassVar[str] = "service"
    _toml_data: ClassVar[dict[str, Any]] = {}

    host: str = "127.0.0.1"
    """Address the gRPC server binds to."""
    port: int = Field(default=0, ge=0, le=65535)
    """gRPC port; 0 picks a free one (printed in the log and the ready file)."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Port of the Prometheus /metrics endpoint; 0 picks a free one."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis that holds experience and state."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Lowest level that is logged."""
    log_format: Literal["json", "text"] = "json"
    """json: one object per line for log shippers; text: for a terminal."""
    ready_file: str = ""
    """If set, the process writes its bound ports here as JSON once it serves (the launcher reads it)."""
    max_message_mb: int = Field(default=256, ge=1, le=2048)
    """Largest gRPC message accepted or sent, in MiB."""
    redis_password: SecretStr = SecretStr("")
    """Redis password (added to redis_url's connections); prefer redis_password_file."""
    redis_password_file: str = ""
    """File holding the Redis password (e.g. a mounted Kubernetes Secret); wins over
    redis_password."""
    tls_cert_file: str = ""
    """PEM certificate of this service's gRPC server; with tls_key_file it serves TLS only."""
    tls_key_file: str = ""
    """PEM private key of tls_cert_file."""
    tls_ca_file: str = ""
    """PEM CA bundle; when set, this process's gRPC clients use TLS and verify servers with it."""
    tls_client_auth: bool = False
    """Mutual TLS: the server requires client certificates signed by tls_ca_file, and clients
    present tls_cert_file."""
    tls_server_name: str = ""
    """Name clients expect in server certificates instead of the address's host."""

    def __repr_args__(self):
        from rlfleet.common.security import redact_url

        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "redis_url" else value

    @model_validator(mode="after")
    def _security(self) -> ServiceConfig:
        from rlfleet.common.security import resolve_secret, tls_of, with_redis_password

        tls_of(self).check()
        password = resolve_secret(
            self.redis_password, self.redis_password_file, name="redis_password"
        )
        if password:
            self.redis_url = with_redis_password(self.redis_url, password)
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings, env_settings, _TomlSource(settings_cls, cls._toml_data))


def _flag_parser(cls: type[ServiceConfig]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"rlfleet {cls.service_name}",
        description=(cls.__doc__ or "").strip(),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config", help="TOML file with settings (lower priority than env and flags)"
    )
    for name, field in cls.model_fields.items():
        doc = field.description or ""
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag, f"--{name}", dest=name, help=f"{doc} (default: {field.default!r})"
        )
    return parser


def load_config(cls: type[T], argv: list[str] | None = None) -> T:
    """Builds ``cls`` from defaults, ``--config`` TOML, environment and flags.

    Exits with a one-line message naming the bad field instead of a traceback.
    """
    args = vars(_flag_parser(cls).parse_args(sys.argv[1:] if argv is None else argv))
    toml_path = args.pop("config", None)
    toml_data: dict[str, Any] = {}
    if toml_path:
        path = Path(toml_path)
        if not path.is_file():
            raise SystemExit(f"error: config file {path} does not exist")
        try:
            toml_data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise SystemExit(f"error: config file {path} is not valid TOML: {exc}") from None
    cls._toml_data = toml_data
    try:
        cfg = cls(**args)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise SystemExit(
            f"error: invalid {cls.service_name} settings:\n" + "\n".join(lines)
        ) from None
    finally:
        cls._toml_data = {}
    from rlfleet.common.security import set_client_tls, tls_of

    set_client_tls(tls_of(cfg))  # every make_channel of this process dials this way
    return cfg
