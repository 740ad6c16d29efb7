"""Every service, as the real process, against malformed, oversized and random requests.

- malformed bytes (not a protobuf message) to every method: INVALID_ARGUMENT;
- a request over the message limit (services run with --max-message-mb 1):
  RESOURCE_EXHAUSTED;
- hypothesis builds random requests of each method's type from its protobuf
  descriptor (bounded examples); no answer may be INTERNAL or UNKNOWN (an
  unhandled error), and every service is still alive and SERVING afterwards.

String fields that name a peer (``*address``) only ever get loopback addresses
of closed ports: a fuzzer must not make a service dial out.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rlfleet.common.procs import free_port
from rlfleet.v1 import reward_pb2, rollout_pb2, scheduler_pb2, trainer_pb2, weightsync_pb2

pytestmark = pytest.mark.slow

MODULES = {
    "reward": reward_pb2,
    "rollout": rollout_pb2,
    "scheduler": scheduler_pb2,
    "trainer": trainer_pb2,
    "weightsync": weightsync_pb2,
}
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
EXAMPLES = 20
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def services(tmp_path_factory, redis_proc, tiny_model_dir):
    from rlfleet.common.procs import redis_url_of, start_service

    run = tmp_path_factory.mktemp("fuzz")
    redis_url = redis_url_of(redis_proc).rsplit("/", 1)[0] + "/15"
    dead = f"127.0.0.1:{free_port()}"  # peers that never answer
    common = ["--redis-url", redis_url, "--max-message-mb", "1", "--log-format", "text"]
    plan = {
        "weightsync": ["--spool-dir", str(run / "spool"), "--chunk-bytes", "262144"],
        "reward": [],
        "trainer": ["--weightsync-address", dead, "--checkpoint-dir", str(run / "ckpt")],
        # with a model, so Generate runs the engine on whatever it is sent
        "rollout": [
            "--weightsync-address", dead,
            "--model-path", str(tiny_model_dir),
            "--pull-timeout-s", "2",  # LoadVersion from a dead weight-sync gives up soon
            "--device", "cpu",
            "--torch-threads", "1",
        ],
        "scheduler": [
            "--rollout-addresses", dead,
            "--reward-address", dead,
            "--trainer-address", dead,
            "--retry-deadline-s", "1",
        ],
    }  # fmt: skip

    def start(name):
        return start_service(
            name, f"rlfleet.{name}", common + plan[name], run_dir=run / "run", env=ENV
        )

    with ThreadPoolExecutor(max_workers=5) as pool:
        procs = dict(zip(plan, pool.map(start, plan), strict=True))
    yield procs
    for proc in procs.values():
        proc.stop()


def _methods(name: str):
    module = MODULES[name]
    (service,) = module.DESCRIPTOR.services_by_name.values()
    for method in service.methods:
        yield service, method, getattr(module, method.input_type.name)


def _invoke(channel: grpc.Channel, service, method, payload, *, timeout: float = 20.0):
    """Sends ``payload`` (a message, or raw bytes) and drains the answer."""
    path = f"/{service.full_name}/{method.name}"
    ser = (lambda b: b) if isinstance(payload, bytes) else (lambda m: m.SerializeToString())
    if method.client_streaming:
        call = channel.stream_unary(path, request_serializer=ser)
        return call(iter([payload]), timeout=timeout)
    if method.server_streaming:
        return list(channel.unary_stream(path, request_serializer=ser)(payload, timeout=timeout))
    return channel.unary_unary(path, request_serializer=ser)(payload, timeout=timeout)


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# -- strategies from descriptors ------------------------------------------------

_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_WORDS = [
    "",
    "job-1",
    "job-fuzz",
    "../../etc/passwd",
    "x" * 300,
    "\x00",
    "{}",
    '{"model": {"path": "/nonexistent"}}',
    "exact",
    "regex",
    "math",
    "reasoning_gym",
    "code",
    "queued",
    "running",
]


def _string(field_name: str):
    if field_name.endswith("address"):
        return st.sampled_from(["", "127.0.0.1:1", f"127.0.0.1:{free_port()}"])
    return st.one_of(st.sampled_from(_WORDS), st.text(max_size=40))


def _scalar(field: FieldDescriptor, depth: int):
    t = field.type
    if t in _INTS:
        lo, hi = _INTS[t]
        return st.one_of(
            st.integers(lo, hi), st.sampled_from([0, 1, -1, lo, hi]).filter(lambda v: lo <= v <= hi)
        )
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return _string(field.name)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=128)
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if t == FieldDescriptor.TYPE_MESSAGE:
        return message_of(field.message_type, depth + 1)
    raise AssertionError(f"unhandled field type {t}")


def message_of(descriptor, depth: int = 0):
    """A strategy of messages of ``descriptor``'s type, any subset of fields set."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(descriptor)
    if depth > 2:
        return st.just(cls())
    fields = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            fields[field.name] = st.dictionaries(
                _scalar(key, depth), _scalar(value, depth), max_size=3
            )
        elif field.is_repeated:
            fields[field.name] = st.lists(_scalar(field, depth), max_size=4)
        else:
            fields[field.name] = _scalar(field, depth)
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: cls(**kw))


# -- the tests --------------------------------------------------------------------

ALL = [(name, m.name) for name in MODULES for _, m, _ in _methods(name)]


@pytest.mark.parametrize(("name", "method_name"), ALL)
def test_random_requests_never_crash_a_service(services, name, method_name):
    proc = services[name]
    ((service, method, cls),) = [x for x in _methods(name) if x[1].name == method_name]
    seen: dict[grpc.StatusCode, int] = {}

    with grpc.insecure_channel(proc.address) as channel:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(message_of(method.input_type))
        def check(request):
            code = _code(lambda: _invoke(channel, service, method, request))
            seen[code] = seen.get(code, 0) + 1
            assert code not in BAD_CODES, f"{method_name}({request}) -> {code}"

        check()
        assert (
            _code(lambda: _invoke(channel, service, method, b"\xff\xff\xff\xff\x0f"))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
    assert proc.alive(), proc.log_tail()
    print(f"{name}.{method_name}: {json.dumps({c.name: n for c, n in seen.items()})}")


@pytest.mark.parametrize("name", list(MODULES))
def test_oversized_requests_are_refused_and_services_stay_healthy(services, name):
    proc = services[name]
    service, method, cls = next(iter(_methods(name)))
    big = cls()
    string_fields = [f for f in method.input_type.fields if f.type == FieldDescriptor.TYPE_STRING]
    if string_fields and not method.client_streaming:
        setattr(big, string_fields[0].name, "x" * (2 * 1024 * 1024))
        payload = big
    else:
        payload = b"\x0a" + b"\x80\x80\x80\x01" + b"x" * (2 * 1024 * 1024)  # 2 MiB field
    with grpc.insecure_channel(proc.address) as channel:
        code = _code(lambda: _invoke(channel, service, method, payload))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert proc.alive(), proc.log_tail()
