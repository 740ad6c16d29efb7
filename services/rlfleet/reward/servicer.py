"""gRPC adapter over ``RewardCore``; no logic of its own."""

from __future__ import annotations

from rlfleet.reward.core import RewardCore, parse_verifier_config
from rlfleet.v1 import reward_pb2, reward_pb2_grpc


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, core: RewardCore):
        self.core = core

    def Score(self, request: reward_pb2.ScoreRequest, context) -> reward_pb2.ScoreResponse:
        result = self.core.score(
            job_id=request.job_id,
            verifier=request.verifier,
            verifier_config=parse_verifier_config(request.verifier_config_json),
            samples=list(request.samples),
            write_to_buffer=request.write_to_buffer,
        )
        return reward_pb2.ScoreResponse(
            rewards=result.rewards,
            written=result.written,
            terms={
                name: reward_pb2.TermScores(scores=scores) for name, scores in result.terms.items()
            },
        )

    def Write(self, request: reward_pb2.WriteRequest, context) -> reward_pb2.WriteResponse:
        return reward_pb2.WriteResponse(
            written=self.core.write(job_id=request.job_id, samples=list(request.samples))
        )
