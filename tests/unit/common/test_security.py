"""TLS for gRPC (self-signed CA made here with `cryptography`), secrets from files,
and no secret in a service's log after it used one."""

from __future__ import annotations

import datetime
import ipaddress
import json
from pathlib import Path

import grpc
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr
from rlfleet.common.config import ServiceConfig, load_config
from rlfleet.common.grpc_client import make_channel, wait_healthy
from rlfleet.common.grpc_server import start_server
from rlfleet.common.procs import start_redis
from rlfleet.common.security import (
    TlsFiles,
    client_tls,
    redact_url,
    resolve_secret,
    set_client_tls,
    with_redis_password,
)
from rlfleet.v1 import common_pb2, reward_pb2, reward_pb2_grpc


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(subject: str, key, *, issuer=None, issuer_key=None, ca: bool = False, sans=()):
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pki(root: Path, tag: str) -> dict[str, Path]:
    """A CA, a server cert for 127.0.0.1/localhost and a client cert, as PEM files."""
    root.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert(f"rlfleet-test-ca-{tag}", ca_key, ca=True)
    server_key, client_key = _key(), _key()
    server = _cert(
        "rlfleet-server",
        server_key,
        issuer=ca,
        issuer_key=ca_key,
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = _cert("rlfleet-client", client_key, issuer=ca, issuer_key=ca_key)
    files = {
        "ca": (ca.public_bytes(serialization.Encoding.PEM)),
        "cert": server.public_bytes(serialization.Encoding.PEM),
        "key": _pem_key(server_key),
        "client_cert": client.public_bytes(serialization.Encoding.PEM),
        "client_key": _pem_key(client_key),
    }
    out = {}
    for name, data in files.items():
        path = root / f"{name}.pem"
        path.write_bytes(data)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return _pki(tmp_path_factory.mktemp("pki"), "a")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> dict[str, Path]:
    return _pki(tmp_path_factory.mktemp("pki-other"), "b")


class _Cfg(ServiceConfig):
    service_name = "tlstest"


def _serve(**tls):
    return start_server(
        _Cfg(port=0, **tls), lambda server: None, service_names=["x"], metrics=False
    )


def _check(address: str, tls: TlsFiles) -> int:
    # A refused handshake fails at once (UNAVAILABLE); the timeout only bounds a hang, and
    # a TLS handshake on a loaded 2-core machine can take seconds.
    with make_channel(address, tls=tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=30).status


def test_tls_server_accepts_only_clients_that_trust_it(pki, other_pki):
    running = _serve(tls_cert_file=str(pki["cert"]), tls_key_file=str(pki["key"]))
    try:
        good = TlsFiles(ca_file=str(pki["ca"]))
        assert _check(running.address, good) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as plain:
            _check(running.address, TlsFiles())  # plaintext to a TLS port
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as untrusted:
            _check(running.address, TlsFiles(ca_file=str(other_pki["ca"])))
        assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
        # the certificate names 127.0.0.1; a different expected name is refused
        with pytest.raises(grpc.RpcError):
            _check(running.address, TlsFiles(ca_file=str(pki["ca"]), server_name="elsewhere"))
        assert (
            _check(running.address, TlsFiles(ca_file=str(pki["ca"]), server_name="localhost"))
            == health_pb2.HealthCheckResponse.SERVING
        )
    finally:
        running.stop(0)


def test_mutual_tls_requires_a_client_certificate(pki):
    running = _serve(
        tls_cert_file=str(pki["cert"]),
        tls_key_file=str(pki["key"]),
        tls_ca_file=str(pki["ca"]),
        tls_client_auth=True,
    )
    try:
        with pytest.raises(grpc.RpcError):
            _check(running.address, TlsFiles(ca_file=str(pki["ca"])))
        mutual = TlsFiles(
            cert_file=str(pki["client_cert"]),
            key_file=str(pki["client_key"]),
            ca_file=str(pki["ca"]),
            client_auth=True,
        )
        assert _check(running.address, mutual) == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(0)


def test_default_is_plaintext_and_load_config_sets_the_client_tls(pki):
    running = _serve()
    try:
        assert _check(running.address, TlsFiles()) == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(0)
    before = client_tls()
    try:
        load_config(_Cfg, ["--tls-ca-file", str(pki["ca"])])
        assert client_tls() == TlsFiles(ca_file=str(pki["ca"]))
    finally:
        set_client_tls(before)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"tls_cert_file": "x.pem"}, "together"),
        ({"tls_client_auth": True}, "tls_client_auth needs"),
        ({"tls_ca_file": "/nonexistent/ca.pem"}, "not a readable file"),
        ({"redis_password_file": "/nonexistent/pw"}, "redis_password_file"),
    ],
)
def test_bad_security_settings_name_the_field(settings, match):
    with pytest.raises(ValueError, match=match):
        _Cfg(**settings)


def test_secrets_from_value_or_file(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    assert resolve_secret("value", str(secret)) == "from-file"
    assert resolve_secret(SecretStr("value")) == "value"
    assert resolve_secret() == ""
    cfg = _Cfg(redis_url="redis://127.0.0.1:6380/2", redis_password_file=str(secret))
    assert cfg.redis_url == "redis://:from-file@127.0.0.1:6380/2"
    assert "value" not in repr(_Cfg(redis_password="value"))


def test_redis_urls_with_and_without_passwords():
    url = with_redis_password("redis://127.0.0.1:6379/0", "p@ss:w/rd")
    assert url == "redis://:p%40ss%3Aw%2Frd@127.0.0.1:6379/0"
    assert redis.Redis.from_url(url).connection_pool.connection_kwargs["password"] == "p@ss:w/rd"
    assert redact_url(url) == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.mark.slow
def test_services_use_tls_and_a_redis_password_and_log_neither(service_factory, tmp_path, pki):
    """A real reward service: TLS on its port, the Redis password from a file; after it
    wrote experience, neither the password nor the key appears in its log."""
    password = "redis-pw-4b7c1e9a"
    redis_proc = start_redis(tmp_path / "redis", password=password)
    try:
        pw_file = tmp_path / "redis-password"
        pw_file.write_text(password + "\n")
        pw_file.chmod(0o600)
        reward = service_factory(
            "reward",
            "rlfleet.reward",
            [
                "--redis-url",
                f"redis://127.0.0.1:{redis_proc.port}/0",
                "--redis-password-file",
                str(pw_file),
                "--tls-cert-file",
                str(pki["cert"]),
                "--tls-key-file",
                str(pki["key"]),
            ],
        )
        tls = TlsFiles(ca_file=str(pki["ca"]))
        wait_healthy(reward.address, timeout=30, tls=tls)
        with make_channel(reward.address, tls=tls) as channel:
            reply = reward_pb2_grpc.RewardServiceStub(channel).Score(
                reward_pb2.ScoreRequest(
                    job_id="sec",
                    verifier="exact",
                    samples=[
                        common_pb2.Sample(
                            sample_id="s0",
                            completion_text=" 4",
                            task_json=json.dumps({"answer": "4"}),
                        )
                    ],
                    write_to_buffer=True,
                ),
                timeout=30,
            )
        assert list(reply.rewards) == [1.0] and reply.written == 1
        client = redis.Redis(port=redis_proc.port, password=password)
        assert client.scard("rlfleet:exp:sec:ids") == 1
        client.close()
        log = reward.log_path.read_text()
        assert password not in log
        assert pki["key"].read_text().splitlines()[1] not in log
    finally:
        redis_proc.stop()


def test_rest_api_serves_https_only_with_the_configured_certificate(pki):
    import httpx
    from fastapi import FastAPI
    from rlfleet.scheduler.api.server import HttpServer

    app = FastAPI()
    app.state.stopping = __import__("threading").Event()

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    server = HttpServer(
        app, host="127.0.0.1", port=0, tls_cert_file=str(pki["cert"]), tls_key_file=str(pki["key"])
    ).start()
    try:
        assert server.url.startswith("https://")
        ok = httpx.get(f"{server.url}/healthz", verify=str(pki["ca"]), timeout=30)
        assert ok.json() == {"status": "ok"}
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)  # plaintext refused
    finally:
        server.stop()
