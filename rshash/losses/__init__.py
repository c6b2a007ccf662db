"""Loss terms of DUCH and CHNR as pure functions of tensors."""

from rshash.losses.adversarial import critic_loss, generator_loss, gradient_penalty
from rshash.losses.contrastive import nt_xent
from rshash.losses.regularizers import bit_balance_loss, quantization_loss

__all__ = [
    "bit_balance_loss",
    "critic_loss",
    "generator_loss",
    "gradient_penalty",
    "nt_xent",
    "quantization_loss",
]
