"""Training: one shared epoch loop, a trainer per method, and the run directory."""

from rshash.training.config import CHNRConfig, LossConfig, OptimConfig, TrainConfig
from rshash.training.run import HashRun, train

__all__ = ["CHNRConfig", "HashRun", "LossConfig", "OptimConfig", "TrainConfig", "train"]
