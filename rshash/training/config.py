"""The training configuration; it lives in `rshash.models.config` (below index and training)."""

from rshash.models.config import (
    BaselineConfig,
    CHNRConfig,
    LossConfig,
    Method,
    OptimConfig,
    TrainConfig,
    Weighting,
    default_lr,
)

__all__ = [
    "BaselineConfig",
    "CHNRConfig",
    "LossConfig",
    "Method",
    "OptimConfig",
    "TrainConfig",
    "Weighting",
    "default_lr",
]
