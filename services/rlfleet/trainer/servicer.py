"""gRPC adapter of the trainer core: request checks in, domain errors out."""

from __future__ import annotations

from pydantic import ValidationError

from rlfleet.common.errors import InvalidArgument
from rlfleet.common.grpc_server import describe_validation_error
from rlfleet.common.jobspec import JobSpec
from rlfleet.trainer.core import TrainerCore
from rlfleet.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, core: TrainerCore):
        self.core = core

    def InitJob(self, request, context):
        try:
            spec = JobSpec.model_validate_json(request.spec_json or "")
        except ValidationError as exc:
            raise InvalidArgument("spec_json: " + describe_validation_error(exc)) from None
        version, resumed = self.core.init_job(request.job_id, spec)
        return trainer_pb2.InitJobResponse(version=version, resumed=resumed)

    def TrainStep(self, request, context):
        result = self.core.train_step(request.job_id, request.step, request.num_samples,
                                      background=request.publish_in_background)  # fmt: skip
        return trainer_pb2.TrainStepResponse(
            version=result.version,
            metrics=result.metrics,
            samples_trained=result.samples_trained,
            checkpoint_path=result.checkpoint_path,
        )

    def GetStatus(self, request, context):
        version, last_step = self.core.status(request.job_id)
        return trainer_pb2.TrainerStatus(
            job_id=request.job_id, version=version, last_step=last_step
        )

    def OpenWeightGroup(self, request, context):
        group = self.core.open_weight_group(request.job_id, request.world_size, request.backend)
        if group is None:  # closed
            return common_pb2.WeightGroupAddress()
        return common_pb2.WeightGroupAddress(host=group.host, port=group.port,
                                             world_size=group.world_size,
                                             generation=group.generation,
                                             backend=group.backend)  # fmt: skip
