"""Engines: what turns the loop's losses into updates and checkpoints, one module per `parallel.engine`."""

from trainers.engines.deepspeed import DeepSpeedEngine, build_deepspeed
from trainers.engines.fsdp import FSDPEngine

__all__ = ["DeepSpeedEngine", "FSDPEngine", "build_deepspeed"]
