"""Scripted rollout / reward / trainer servers for the scheduler's tests.

They are real gRPC servers (``start_server`` on port 0) that follow the
contracts in proto/, but with behaviour a test can script: a replica that dies
mid-stream, one that blocks until Abort, a trainer that waits at a step. The
whole real fleet runs in tests/integration/test_scheduler_fleet.py; these make
the failure paths reachable without a model.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from rlfleet.common.config import ServiceConfig
from rlfleet.common.errors import DataLoss, InvalidArgument, ResourceExhausted, Unavailable
from rlfleet.common.grpc_server import RunningServer, start_server
from rlfleet.common.tinymodel import EOS, train_tokenizer
from rlfleet.v1 import (
    reward_pb2,
    reward_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

COMPLETION = " 42"


def _raise(code: grpc.StatusCode, message: str):
    # Servicers raise domain errors; the shared interceptor maps them to the code.
    # (context.abort() inside the interceptor would come out as INTERNAL.)
    for cls in (Unavailable, InvalidArgument, DataLoss, ResourceExhausted):
        if cls.grpc_code == code:
            raise cls(message)
    raise ValueError(f"no domain error for {code}")


def write_tokenizer_model(out: Path) -> Path:
    """A model directory with only what the scheduler reads: tokenizer.json and config.json."""
    corpus = [f"What is {a} + {b}? Answer: {a + b}" for a in range(30) for b in range(30)]
    tok = train_tokenizer(corpus, vocab_size=300)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "config.json").write_text(json.dumps({"eos_token_id": tok.token_to_id(EOS)}))
    return out


def _serve(name: str, register) -> RunningServer:
    cfg = ServiceConfig(host="127.0.0.1", port=0)
    return start_server(cfg, register, service_names=[name], max_workers=8, metrics=False)


@dataclass
class ReplicaScript:
    """What a scripted replica does. Codes are grpc.StatusCode or None."""

    fail_generate: grpc.StatusCode | None = None
    fail_generate_after: int = 0  # results streamed before the failure
    fail_times: int = 1_000_000  # how many Generate calls fail (then it works)
    fail_load: grpc.StatusCode | None = None
    block_until_abort: bool = False


class ScriptedReplica(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, replica_id: str, completion_ids: list[int], eos_id: int):
        self.replica_id = replica_id
        self.completion_ids = completion_ids
        self.eos_id = eos_id
        self.script = ReplicaScript()
        self.version = 0
        self.job_id = ""
        self.loads: list[rollout_pb2.LoadVersionRequest] = []
        self.generates: list[rollout_pb2.GenerateRequest] = []
        self.aborts = 0
        self.generating = threading.Event()
        self._abort = threading.Event()
        self._lock = threading.Lock()

    def forget(self) -> None:
        """As after a restart: holds nothing."""
        self.version, self.job_id = 0, ""

    def Generate(self, request, context):  # noqa: N802
        with self._lock:
            self.generates.append(request)
            failing = self.script.fail_generate is not None and self.script.fail_times > 0
            if failing:
                self.script.fail_times -= 1
        self._abort.clear()
        self.generating.set()
        if self.script.block_until_abort:
            self._abort.wait(30)
            for seq in request.sequences:
                yield rollout_pb2.SequenceResult(
                    seq_id=seq.seq_id, finished=False, finish_reason="aborted"
                )
            return
        ids = [*self.completion_ids, self.eos_id]
        for i, seq in enumerate(request.sequences):
            if failing and i >= self.script.fail_generate_after:
                _raise(self.script.fail_generate, f"{self.replica_id} is going away")
            yield rollout_pb2.SequenceResult(
                seq_id=seq.seq_id,
                token_ids=ids,
                logprobs=[-0.5] * len(ids),
                versions=[self.version] * len(ids),
                finished=True,
                finish_reason="stop",
            )

    def Abort(self, request, context):  # noqa: N802
        self.aborts += 1
        self._abort.set()
        return rollout_pb2.AbortResponse(aborted=1)

    def LoadVersion(self, request, context):  # noqa: N802
        self.loads.append(request)
        if self.script.fail_load is not None:
            _raise(self.script.fail_load, f"{self.replica_id} cannot load")
        self.version, self.job_id = request.version, request.job_id
        return rollout_pb2.LoadVersionResponse(version=request.version, load_seconds=0.01)

    def GetStatus(self, request, context):  # noqa: N802
        return rollout_pb2.RolloutStatus(
            replica_id=self.replica_id, version=self.version, engine="scripted", job_id=self.job_id
        )


class ScriptedReward(reward_pb2_grpc.RewardServiceServicer):
    """Reward 1 when the completion text is COMPLETION stripped, else 0."""

    def __init__(self):
        self.requests: list[reward_pb2.ScoreRequest] = []
        self.fail: grpc.StatusCode | None = None

    def Score(self, request, context):  # noqa: N802
        self.requests.append(request)
        if self.fail is not None:
            _raise(self.fail, "verifier 'nope' is not known")
        rewards = [float(s.completion_text.strip() == COMPLETION.strip()) for s in request.samples]
        terms = {}
        if request.verifier == "weighted":  # a format term always met, and the match itself
            terms = {
                "format": reward_pb2.TermScores(scores=[1.0] * len(rewards)),
                "exact": reward_pb2.TermScores(scores=rewards),
            }
        return reward_pb2.ScoreResponse(rewards=rewards, written=len(rewards), terms=terms)


@dataclass
class ScriptedTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    init_version: int = 0
    inits: list[str] = field(default_factory=list)
    steps: list[tuple[str, int, int]] = field(default_factory=list)
    block_at_step: int | None = None
    at_block: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def InitJob(self, request, context):  # noqa: N802
        self.inits.append(request.job_id)
        return trainer_pb2.InitJobResponse(version=self.init_version, resumed=self.init_version > 0)

    def TrainStep(self, request, context):  # noqa: N802
        if request.step == self.block_at_step:
            self.at_block.set()
            self.release.wait(60)
        self.steps.append((request.job_id, request.step, request.num_samples))
        return trainer_pb2.TrainStepResponse(
            version=request.step + 1,
            metrics={"loss": 0.25, "grad_norm": 1.5},
            samples_trained=request.num_samples,
        )

    def GetStatus(self, request, context):  # noqa: N802
        return trainer_pb2.TrainerStatus(job_id=request.job_id)


class ScriptedFleet:
    """Two (or more) replicas, a reward and a trainer, each a gRPC server of its own."""

    def __init__(self, model_dir: Path, *, replicas: int = 2):
        from tokenizers import Tokenizer

        self.model_dir = model_dir
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        completion = tok.encode(COMPLETION).ids
        eos = tok.token_to_id(EOS)
        self.replicas = [ScriptedReplica(f"r{i}", completion, eos) for i in range(replicas)]
        self.reward = ScriptedReward()
        self.trainer = ScriptedTrainer()
        self.servers: list[RunningServer] = []
        self.replica_addresses = []
        for replica in self.replicas:
            server = _serve(
                "rlfleet.v1.RolloutService",
                lambda s, r=replica: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(r, s),
            )
            self.servers.append(server)
            self.replica_addresses.append(server.address)
        reward_server = _serve(
            "rlfleet.v1.RewardService",
            lambda s: reward_pb2_grpc.add_RewardServiceServicer_to_server(self.reward, s),
        )
        trainer_server = _serve(
            "rlfleet.v1.TrainerService",
            lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(self.trainer, s),
        )
        self.servers += [reward_server, trainer_server]
        self.reward_address = reward_server.address
        self.trainer_address = trainer_server.address

    def stop_replica(self, i: int) -> None:
        self.servers[i].server.stop(0).wait()

    def close(self) -> None:
        self.trainer.release.set()
        for replica in self.replicas:
            replica._abort.set()
        for server in self.servers:
            server.server.stop(0).wait()
