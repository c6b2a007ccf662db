"""Hash networks, the code discriminator and the noise detector."""

from rshash.models.hashing import CodeDiscriminator, HashNet
from rshash.models.noise_detector import NoiseDetector

__all__ = ["CodeDiscriminator", "HashNet", "NoiseDetector"]
