"""gRPC adapter of RolloutService over ``RolloutCore``: messages in, messages out."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from rlfleet.rollout.core import RolloutCore
from rlfleet.rollout.engine import Sampling, SeqRequest, SeqResult
from rlfleet.v1 import rollout_pb2, rollout_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name


def to_seq_request(msg: rollout_pb2.SequenceRequest) -> SeqRequest:
    return SeqRequest(
        seq_id=msg.seq_id,
        prompt_token_ids=list(msg.prompt_token_ids),
        prefix_token_ids=list(msg.prefix_token_ids),
        prefix_logprobs=list(msg.prefix_logprobs),
        prefix_versions=list(msg.prefix_versions),
        max_new_tokens=msg.max_new_tokens,
    )


def to_sampling(msg: rollout_pb2.SamplingParams) -> Sampling:
    return Sampling(
        max_new_tokens=msg.max_new_tokens,
        temperature=msg.temperature,
        # The proto says 0 or 1 disables nucleus sampling; the engine spells that 1.
        top_p=1.0 if msg.top_p == 0 else msg.top_p,
        seed=msg.seed,
        resume_kv=msg.resume_kv,
    )


def to_result_msg(result: SeqResult) -> rollout_pb2.SequenceResult:
    return rollout_pb2.SequenceResult(
        seq_id=result.seq_id,
        token_ids=result.token_ids,
        logprobs=result.logprobs,
        versions=result.versions,
        finished=result.finished,
        finish_reason=result.finish_reason,
    )


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, core: RolloutCore):
        self.core = core

    def Generate(self, request, context) -> Iterator[rollout_pb2.SequenceResult]:
        stream = self.core.generate(
            [to_seq_request(s) for s in request.sequences], to_sampling(request.sampling)
        )
        # A caller that goes away (cancel, deadline) stops its sequences' sampling.
        context.add_callback(stream.cancel)
        for result in stream:
            yield to_result_msg(result)

    def Abort(self, request, context) -> rollout_pb2.AbortResponse:
        return rollout_pb2.AbortResponse(aborted=self.core.abort())

    def LoadVersion(self, request, context) -> rollout_pb2.LoadVersionResponse:
        version, seconds, via = self.core.load_version(
            job_id=request.job_id,
            version=request.version,
            model_path=request.model_path,
            weightsync_address=request.weightsync_address,
        )
        return rollout_pb2.LoadVersionResponse(version=version, load_seconds=seconds, via=via)

    def JoinWeightGroup(self, request, context) -> rollout_pb2.JoinWeightGroupResponse:
        from rlfleet.common.weight_group import GroupAddress

        g = request.group
        group = GroupAddress(g.host, g.port, g.world_size, g.generation, g.backend or "gloo")
        self.core.join_weight_group(request.job_id, group, request.rank)
        return rollout_pb2.JoinWeightGroupResponse()

    def GetStatus(self, request, context) -> rollout_pb2.RolloutStatus:
        s = self.core.status()
        return rollout_pb2.RolloutStatus(
            replica_id=s.replica_id,
            version=s.version,
            engine=s.engine,
            running_sequences=s.running_sequences,
            model_path=s.model_path,
            job_id=s.job_id,
        )
