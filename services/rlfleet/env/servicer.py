"""gRPC adapter over ``EnvCore``; no logic of its own."""

from __future__ import annotations

from rlfleet.env.core import EnvCore
from rlfleet.env.protocol import Message
from rlfleet.v1 import env_pb2, env_pb2_grpc


def _messages(messages: list[Message]) -> list[env_pb2.ChatMessage]:
    return [env_pb2.ChatMessage(role=m.role, content=m.content, name=m.name) for m in messages]


class EnvServicer(env_pb2_grpc.EnvServiceServicer):
    def __init__(self, core: EnvCore):
        self.core = core

    def Reset(self, request: env_pb2.ResetRequest, context) -> env_pb2.Observation:
        reply = self.core.reset(
            episode_id=request.episode_id,
            env_name=request.env_name,
            row_json=request.row_json,
            options_json=request.options_json,
        )
        return env_pb2.Observation(
            episode_id=reply.episode_id,
            messages=_messages(reply.messages),
            tools_json=reply.tools_json,
            done=False,
        )

    def Step(self, request: env_pb2.StepRequest, context) -> env_pb2.StepReply:
        reply = self.core.step(
            episode_id=request.episode_id, turn=request.turn, model_text=request.model_text
        )
        return env_pb2.StepReply(
            messages=_messages(reply.messages),
            reward_so_far=reply.reward_so_far,
            done=reply.done,
            info_json=reply.info_json,
        )

    def Close(self, request: env_pb2.CloseRequest, context) -> env_pb2.CloseReply:
        return env_pb2.CloseReply(closed=self.core.close(episode_id=request.episode_id))

    def ListEnvironments(
        self, request: env_pb2.ListEnvironmentsRequest, context
    ) -> env_pb2.ListEnvironmentsReply:
        return env_pb2.ListEnvironmentsReply(names=self.core.names())
