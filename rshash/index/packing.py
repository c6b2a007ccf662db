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


ALIGN = 64  # bytes: a cache line, and one AVX-512 register


def aligned_empty(shape: tuple[int, ...], dtype: type = np.uint64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a cache line.

    Vector loads that straddle two cache lines cost up to a quarter of the scan speed.
    """
    itemsize = np.dtype(dtype).itemsize
    size = int(np.prod(shape))
    raw = np.empty(size * itemsize + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + size * itemsize].view(dtype).reshape(shape)


def to_words(packed: np.ndarray) -> np.ndarray:
    """(n, K/8) uint8 → word-major (K/64, n) uint64, the layout the search kernels scan.

    Reinterpreting bytes as words only permutes bits within an item, so Hamming distances are
    unchanged. The first row starts on a cache line (later rows too when n is a multiple of 8).
    """
    packed = np.ascontiguousarray(packed, np.uint8)
    words = aligned_empty((packed.shape[1] // 8, len(packed)))
    words[:] = packed.view(np.uint64).T
    return words


def query_words(packed: np.ndarray) -> np.ndarray:
    """(q, K/8) uint8 queries → (q, K/64) uint64, row per query."""
    return np.ascontiguousarray(np.ascontiguousarray(packed, np.uint8).view(np.uint64))
