"""Hash codes ↔ packed bits: K bits per item as K/8 bytes (uint8), the on-disk format."""

from __future__ import annotations

import numpy as np

from rshash.errors import RshashError


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """±1 (or 0/1) codes of shape (n, K) → (n, K/8) uint8; bit set where the code is positive."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % 64:
        raise RshashError(f"codes must be (n, K) with K a multiple of 64, got shape {codes.shape}")
    return np.packbits(codes > 0, axis=1)


def unpack_codes(packed: np.ndarray) -> np.ndarray:
    """(n, K/8) uint8 → (n, K) int8 codes in {-1, +1}."""
    bits = np.unpackbits(np.asarray(packed, np.uint8), axis=1).astype(np.int8)
    return bits * 2 - 1


def to_words(packed: np.ndarray) -> np.ndarray:
    """(n, K/8) uint8 → word-major (K/64, n) uint64, the layout the search kernels scan.

    Reinterpreting bytes as words only permutes bits within an item, so Hamming distances are
    unchanged.
    """
    packed = np.ascontiguousarray(packed, np.uint8)
    return np.ascontiguousarray(packed.view(np.uint64).T)


def query_words(packed: np.ndarray) -> np.ndarray:
    """(q, K/8) uint8 queries → (q, K/64) uint64, row per query."""
    return np.ascontiguousarray(np.ascontiguousarray(packed, np.uint8).view(np.uint64))
