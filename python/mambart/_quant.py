"""Torch-free weight quantization for the converter (issue 18; docs/format.md "Quantized
weights"). numpy only: the converter and the runtime never need torch.

Schemes (weight-only, symmetric, round to nearest even):
  int8: one scale per output row,   s[n] = max_k |w[n, k]| / 127,  q = rint(w / s) in [-127, 127]
  int4: one scale per `group` weights along K (default 128),
        s[n, g] = max_{k in g} |w[n, k]| / 7,  q = rint(w / s) in [-7, 7], stored as u = q + 8.
        Each block of 32 weights along K is 16 bytes: byte j holds weight j in its low nibble and
        weight j + 16 in its high nibble (op_params.h Weight).
The scales are stored in float16 or bfloat16 (the scale is rounded first, and q computed with
the rounded scale, so w ~= s * q holds for the stored numbers).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ._tensorio import convert_chunk, to_float32

SCHEMES = ("int8", "int4")
SCALE_DTYPES = ("float16", "bfloat16")
QMAX = {"int8": 127, "int4": 7}


def _scales(absmax: np.ndarray, scheme: str, scale_dtype: str, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """(stored scale array in `scale_dtype`'s numpy storage, the same scales as float32)."""
    s = (absmax / np.float32(QMAX[scheme])).astype(np.float32)
    stored = convert_chunk(s.reshape(-1), "float32", scale_dtype, f"{what} (scales)")
    back = to_float32(stored, scale_dtype).reshape(s.shape)
    return stored.reshape(s.shape), back


def quantize(w: np.ndarray, scheme: str, group: int = 128, scale_dtype: str = "float16",
             what: str = "tensor") -> Tuple[np.ndarray, np.ndarray]:
    """Quantizes a (N, K) float matrix. Returns (data, scales): int8 (N, K) int8 and scales (N,);
    int4 (N, K / 2) uint8 and scales (N, K / group); scales in `scale_dtype`'s storage (bfloat16
    as uint16 bits). ValueError for a shape the scheme cannot take or a non-finite weight."""
    if scheme not in SCHEMES:
        raise ValueError(f"{what}: unknown quantization scheme {scheme!r} (expected one of {SCHEMES})")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"{what}: only 2-d matrices are quantized, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{what}: holds NaN or Inf; cannot quantize")
    N, K = w.shape
    if scheme == "int8":
        stored, s = _scales(np.abs(w).max(axis=1) if K else np.zeros(N, np.float32), scheme,
                            scale_dtype, what)
        safe = np.where(s > 0, s, np.float32(1))
        q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
        return q, stored
    if K % 32 or group % 32 or K % group:
        raise ValueError(f"{what}: int4 needs K ({K}) a multiple of the group ({group}), and the "
                         f"group a multiple of 32")
    wg = w.reshape(N, K // group, group)
    stored, s = _scales(np.abs(wg).max(axis=2), scheme, scale_dtype, what)
    safe = np.where(s > 0, s, np.float32(1))
    u = (np.clip(np.rint(wg / safe[:, :, None]), -7, 7) + 8).astype(np.uint8).reshape(N, K // 32, 32)
    packed = (u[:, :, :16] | (u[:, :, 16:] << 4)).astype(np.uint8).reshape(N, K // 2)
    return packed, stored


def dequantize(data: np.ndarray, scales: np.ndarray, scheme: str, group: int = 128,
               scale_dtype: str = "float32") -> np.ndarray:
    """The float64 matrix a quantized (data, scales) pair stands for (the reference of the
    kernels' tests). `scales` in `scale_dtype`'s storage (float32 arrays as they are)."""
    s = to_float32(np.asarray(scales), scale_dtype).astype(np.float64)
    if scheme == "int8":
        return data.astype(np.float64) * s.reshape(-1, 1)
    N = data.shape[0]
    K = data.shape[1] * 2
    b = data.reshape(N, K // 32, 16)
    u = np.concatenate([b & 15, b >> 4], axis=2).reshape(N, K).astype(np.float64) - 8.0
    return u * np.repeat(s.reshape(N, K // group), group, axis=1)
