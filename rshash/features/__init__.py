"""Pretrained encoders, augmented views and the resumable HDF5 feature store."""

from rshash.features.encoders import load_image_encoder, load_text_encoder
from rshash.features.extract import ExtractConfig, extract_features
from rshash.features.store import FeatureStore

__all__ = [
    "ExtractConfig",
    "FeatureStore",
    "extract_features",
    "load_image_encoder",
    "load_text_encoder",
]
