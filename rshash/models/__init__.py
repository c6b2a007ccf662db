"""Hash networks, the code discriminator and the noise detector."""

from rshash.models.hashing import CodeDiscriminator, HashNet

__all__ = ["CodeDiscriminator", "HashNet"]
