"""One GGUF tensor at a time into MLX arrays: llama.cpp's block formats into MLX's quantization.

MLX quantizes affinely per group of consecutive weights along a row: w = scale * q + bias, q an
unsigned integer of `bits` bits. Seven of llama.cpp's formats are exactly that for groups of 32
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and Q4_K and Q5_K with one scale and minimum per 32 weights), so
their integers are carried over bit for bit (5-bit ones into 8-bit integers) and only the scales
are rounded to float16, as every MLX model stores them. The others gguf-py reads (Q2_K, Q3_K and
Q6_K, whose 16-weight sub-blocks have a scale each, MLX's smallest group being 32; the IQ types)
are dequantized by gguf-py and quantized by MLX: to 4 bits for a type of at most 4.5 bits per
weight, to 8 above. Floating types stay floating unless the user asks for bits.

Rows are converted a bounded number at a time, so a 150k-row embedding never exists in float32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K, dequantize

from mlxserve.protocol import ConversionError

T = GGMLQuantizationType
FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})
# Types whose 32-weight blocks are MLX groups as they are, and their bits.
EXACT_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q4_K: 4, T.Q5_0: 8, T.Q5_1: 8, T.Q5_K: 8, T.Q8_0: 8}
EXACT_GROUP = 32
CHUNK_VALUES = 1 << 21  # values dequantized at once: 8 MiB of float32 (gguf-py makes a few times that)


def bits_per_weight(kind: GGMLQuantizationType) -> float:
    elements, size = GGML_QUANT_SIZES[kind]
    return size * 8 / elements


@functools.cache  # asked once per tensor; the answer is the type's
def readable(kind: GGMLQuantizationType) -> bool:
    """Whether gguf-py can dequantize this type (then so can we)."""
    if kind in FLOAT_TYPES:
        return True
    try:
        dequantize(np.zeros(GGML_QUANT_SIZES[kind][1], dtype=np.uint8), kind)
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


BITS = (4, 8)  # what MLX's quantized layers and the CPU shim both take, packed by _pack
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Target:
    """What the user asked for; None leaves it to the source type."""

    bits: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (None, *BITS):
            raise ConversionError(f"--bits {self.bits}: choose one of {', '.join(map(str, BITS))}")
        if self.group_size not in (None, *GROUP_SIZES):
            raise ConversionError(f"--group-size {self.group_size}: choose one of "
                                  f"{', '.join(map(str, GROUP_SIZES))}")

    def bits_for(self, kind: GGMLQuantizationType) -> int | None:
        """Bits for a 2-D weight of this type, or None to keep it floating."""
        if self.bits is not None:
            return self.bits
        if kind in FLOAT_TYPES:
            return None
        if kind in EXACT_BITS:
            return EXACT_BITS[kind]
        return 4 if bits_per_weight(kind) <= 4.5 else 8

    def group_for(self, kind: GGMLQuantizationType) -> int:
        return self.group_size or EXACT_GROUP


@dataclass(frozen=True)
class Converted:
    """A tensor ready for safetensors: `arrays` by suffix ("weight", or "weight", "scales", "biases")."""

    arrays: dict[str, mx.array]
    bits: int | None
    group_size: int | None


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Rows of integers (uint8) as MLX packs them: uint32 words, element 2j in byte j's low nibble."""
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.ascontiguousarray(q).view(np.uint32)


def _half(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block: elements 0-15 in the low nibbles, 16-31 in the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """A 32-bit word per block: bit j is element j's fifth bit."""
    bits = np.ascontiguousarray(qh).view(np.uint32) >> np.arange(32, dtype=np.uint32)
    return ((bits & 1) << 4).astype(np.uint8)


def _k_groups(flat: np.ndarray, rows: int, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K and Q5_K: 8 groups of 32 per 256 weights, a 6-bit scale and minimum each, times d and dmin."""
    d, dmin = _half(flat[:, 0:2]), _half(flat[:, 2:4])
    sc, mn = Q4_K.get_scale_min(flat[:, 4:16])
    return q.reshape(rows, -1), (d * sc.astype(np.float32)).reshape(rows, -1), \
        -(dmin * mn.astype(np.float32)).reshape(rows, -1)


def _exact_blocks(kind: GGMLQuantizationType, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale, bias) per 32-weight group of rows of blocks: q (rows, k) uint8, the others (rows, groups)."""
    rows = blocks.shape[0]
    if kind in (T.Q4_K, T.Q5_K):
        flat = blocks.reshape(-1, blocks.shape[-1])
        shifts = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        if kind == T.Q4_K:  # each 32 bytes: the low nibbles are group 2j, the high ones group 2j + 1
            q = (flat[:, 16:].reshape(-1, 4, 1, 32) >> shifts) & 0x0F
        else:  # and the fifth bits: bit i of each of 32 bytes belongs to group i
            low = (flat[:, 48:].reshape(-1, 4, 1, 32) >> shifts) & 0x0F
            high = (flat[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
            q = low.reshape(-1, 8, 32) | (high << 4)
        return _k_groups(flat, rows, q)
    d = _half(blocks[..., 0:2])[..., 0]
    if kind == T.Q8_0:
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q.reshape(rows, -1), d, -128.0 * d
    q = _nibbles(blocks[..., -16:])
    if kind in (T.Q5_0, T.Q5_1):
        q = q | _fifth_bits(blocks[..., -20:-16])
    offset = {T.Q4_0: -8.0 * d, T.Q5_0: -16.0 * d}.get(kind)
    bias = offset if offset is not None else _half(blocks[..., 2:4])[..., 0]
    return q.reshape(rows, -1), d, bias


def _affine(values: np.ndarray, group: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each group's range in 2^bits - 1 equal steps from its minimum, every weight to the nearest (within half
    a step; MLX's own quantize keeps zero exact instead, a whole step off at worst). The scale and bias are
    rounded to float16 first, as they will be stored, and the integers chosen for those."""
    rows, k = values.shape
    groups = values.reshape(rows, k // group, group)
    low, high = groups.min(axis=-1), groups.max(axis=-1)
    scale = ((high - low) / (2**bits - 1)).astype(np.float16).astype(np.float32)
    bias = low.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale[..., None] > 0, np.rint((groups - bias[..., None]) / scale[..., None]), 0)
    return np.clip(q, 0, 2**bits - 1).astype(np.uint8).reshape(rows, k), scale, bias


def _row_chunks(rows: int, row_values: int):
    step = max(1, CHUNK_VALUES // max(1, row_values))
    return (slice(start, min(rows, start + step)) for start in range(0, rows, step))


def convert_tensor(kind: GGMLQuantizationType, data: np.ndarray, shape: tuple[int, ...], target: Target,
                   quantizable: bool) -> Converted:
    """`data` as gguf-py maps it (rows first, quantized rows as bytes); `shape` in row-major order.

    `quantizable`: a weight of a layer MLX quantizes (its last axis is the one groups run along).
    """
    bits = target.bits_for(kind) if quantizable and len(shape) >= 2 else None
    if bits is None:
        if kind in (T.F32, T.F16):
            return Converted({"weight": mx.array(np.asarray(data).reshape(shape))}, None, None)
        dtype = mx.bfloat16 if kind == T.BF16 else mx.float16
        return Converted({"weight": _floats(kind, data, shape).astype(dtype)}, None, None)
    k = shape[-1]
    rows = int(np.prod(shape[:-1]))
    group = target.group_for(kind)
    if k % group:
        raise ConversionError(f"a row of {k} weights does not split into groups of {group}; choose another "
                              "--group-size")
    flat = np.asarray(data).reshape(rows, -1)
    exact = kind in EXACT_BITS and bits == EXACT_BITS[kind] and group == EXACT_GROUP
    parts: list[tuple[mx.array, mx.array, mx.array]] = []
    for chunk in _row_chunks(rows, k):
        if exact:
            q, scale, bias = _exact_blocks(kind, flat[chunk].reshape(chunk.stop - chunk.start, -1,
                                                                    GGML_QUANT_SIZES[kind][1]))
        else:
            q, scale, bias = _affine(np.array(_floats(kind, flat[chunk], (chunk.stop - chunk.start, k))), group, bits)
        part = (mx.array(_pack(q, bits)), mx.array(scale), mx.array(bias))
        mx.eval(part)
        parts.append(part)
    weight, scales, biases = (mx.concatenate([p[i] for p in parts]) if len(parts) > 1 else parts[0][i]
                              for i in range(3))
    lead = tuple(shape[:-1])
    return Converted({"weight": weight.reshape(*lead, -1), "scales": scales.astype(mx.float16).reshape(*lead, -1),
                      "biases": biases.astype(mx.float16).reshape(*lead, -1)}, bits, group)


def _floats(kind: GGMLQuantizationType, data: np.ndarray, shape: tuple[int, ...]) -> mx.array:
    """Rows as float32 (exact for the floating types)."""
    if kind == T.BF16:  # numpy has no bfloat16: its 16 bits are float32's high half
        return mx.view(mx.array(np.asarray(data).view(np.uint16).astype(np.uint32) << 16), mx.float32).reshape(shape)
    if kind in (T.F32, T.F16):
        return mx.array(np.asarray(data).reshape(shape)).astype(mx.float32)
    return mx.array(dequantize(np.asarray(data), kind).astype(np.float32, copy=False).reshape(shape))
