"""rshash: text-image retrieval in remote-sensing archives with learned binary hash codes."""

__version__ = "0.1.0"
