"""Hash codes ↔ packed bits: K bits per item as whole 64-bit words of bytes (uint8).

A code of K bits (8 ≤ K ≤ 1024) takes `code_bytes(K)` = 8·⌈K/64⌉ bytes: its bits first, then zero
bits up to the word boundary. Queries and items are padded alike, so the padding XORs to zero and
never changes a Hamming distance.
"""

from __future__ import annotations

import mmap

import numpy as np

from rshash.errors import RshashError

MIN_BITS, MAX_BITS = 8, 1024


def check_bits(bits: int) -> int:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise RshashError(f"code length must be {MIN_BITS} to {MAX_BITS} bits, got {bits}")
    return bits


def code_bytes(bits: int) -> int:
    """Bytes per packed code of `bits` bits: whole 64-bit words."""
    return 8 * -(-check_bits(bits) // 64)


def empty_codes(n: int, bits: int) -> np.ndarray:
    """Zeroed buffer for n packed codes of `bits` bits: (n, code_bytes(bits)) uint8, the width
    every encoder, segment and kernel uses (whole 64-bit words)."""
    return np.zeros((n, code_bytes(bits)), np.uint8)


def pad_packed(packed: np.ndarray, bits: int) -> np.ndarray:
    """(n, ⌈K/8⌉ or code_bytes(K)) uint8 → (n, code_bytes(K)), zero bytes appended."""
    packed = np.asarray(packed, np.uint8)
    width = code_bytes(bits)
    if packed.ndim != 2 or packed.shape[1] not in (-(-bits // 8), width):
        raise RshashError(f"codes must be (n, {width}) packed bytes, got {packed.shape}")
    if packed.shape[1] == width:
        return packed
    out = np.zeros((len(packed), width), np.uint8)
    out[:, : packed.shape[1]] = packed
    return out


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """±1 (or 0/1) codes (n, K) → (n, code_bytes(K)) uint8; bit set where the code is positive."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise RshashError(f"codes must be (n, K), got shape {codes.shape}")
    check_bits(codes.shape[1])
    return pad_packed(np.packbits(codes > 0, axis=1), codes.shape[1])


def unpack_codes(packed: np.ndarray, bits: int | None = None) -> np.ndarray:
    """(n, bytes) uint8 → (n, bits) int8 codes in {-1, +1} (padding dropped)."""
    unpacked = np.unpackbits(np.asarray(packed, np.uint8), axis=1).astype(np.int8)
    return (unpacked[:, :bits] if bits is not None else unpacked) * 2 - 1


ALIGN = 64  # bytes: a cache line, and one AVX-512 register
HUGE_PAGE = 1 << 21  # bytes: an x86-64 transparent huge page


def _huge_page_buffer(nbytes: int) -> np.ndarray | None:
    """Anonymous memory that the OS is asked to back with huge pages (Linux), else None."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    buffer = mmap.mmap(-1, nbytes)
    try:
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        return None
    return np.frombuffer(buffer, np.uint8)


def aligned_empty(shape: tuple[int, ...], dtype: type = np.uint64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a cache line.

    Vector loads that straddle two cache lines cost up to a quarter of the scan speed. Arrays of
    a huge page or more start on a huge page and ask for huge pages: a scan then takes 512×
    fewer TLB misses, which on a virtual machine steadied the read bandwidth from 64-133 GB/s
    to 120-130 GB/s.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = _huge_page_buffer(nbytes + HUGE_PAGE) if nbytes >= HUGE_PAGE else None
    align = ALIGN if raw is None else HUGE_PAGE
    if raw is None:
        raw = np.empty(nbytes + ALIGN, np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


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
