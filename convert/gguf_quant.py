"""GGUF weights kept quantized (convert gguf --keep-quantized): llama.cpp's 32-element blocks re-laid out, value for
value, into fasteagle's stored formats (fasteagle/quant.py), instead of dequantized to floats.

    Q4_0  block = d (fp16), 16 bytes of codes          x = d * (q - 8)         -> int4, scale d, zero 0
    Q4_1  block = d, m (fp16), 16 bytes of codes       x = d * q + m           -> int4, scale d, zero m + 8 d
    Q8_0  block = d (fp16), 32 int8 codes              x = d * q               -> int8, one scale per 32 inputs

In a Q4 block, byte j holds element j in its low nibble and element j + 16 in its high one; fasteagle's int4 rows
hold elements 2i (high nibble) and 2i + 1 (low) in byte i, so the codes are reordered, never recomputed. The
dequantized values are the GGUF's: d * (q - 8) + (m + 8 d) equals d * q + m with one rounding each (fp16 d and m,
so m + 8 d is exact in fp32). Other tensor types have no such mapping and are refused by the caller.
"""
import numpy as np
import torch

from fasteagle.errors import FastEagleError

BLOCK = 32
KEPT = {"Q4_0": ("int4", 18), "Q4_1": ("int4", 20), "Q8_0": ("int8", 34)}  # type -> (fasteagle mode, bytes per block)


def _fp16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte offset `at` of every block [rows, n_blocks, block bytes], as fp32 [rows, n_blocks]."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _blocks(data: np.ndarray, type_name: str, shape: tuple[int, int], where: str) -> np.ndarray:
    rows, n_in = shape
    size = KEPT[type_name][1]
    if n_in % BLOCK or data.size != rows * n_in // BLOCK * size:
        raise FastEagleError(f"{where}: {type_name} data of {data.size} bytes does not fit the shape {shape}")
    return np.asarray(data, dtype=np.uint8).reshape(rows, n_in // BLOCK, size)


def q4_to_int4(data: np.ndarray, type_name: str, shape: tuple[int, int], where: str = "tensor"):
    """Q4_0 / Q4_1 raw bytes of an [out, in] weight -> (packed uint8 [out, in // 2], scales_zeros fp32
    [in // 32, out, 2]): quant.py's int4 with group size 32."""
    b = _blocks(data, type_name, shape, where)
    d = _fp16(b, 0)
    zero = np.zeros_like(d) if type_name == "Q4_0" else _fp16(b, 2) + 8 * d
    codes = b[..., 2:18] if type_name == "Q4_0" else b[..., 4:20]
    q = np.concatenate([codes & 15, codes >> 4], -1).reshape(shape[0], shape[1])  # elements in order
    packed = (q[:, 0::2] << 4) | q[:, 1::2]
    scales_zeros = np.stack([d, zero], -1).transpose(1, 0, 2)
    return torch.from_numpy(np.ascontiguousarray(packed)), torch.from_numpy(np.ascontiguousarray(scales_zeros))


def q8_to_int8(data: np.ndarray, shape: tuple[int, int], where: str = "tensor"):
    """Q8_0 raw bytes of an [out, in] weight -> (int8 [out, in], scales fp32 [out, in // 32])."""
    b = _blocks(data, "Q8_0", shape, where)
    q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(shape)
    return torch.from_numpy(q.copy()), torch.from_numpy(np.ascontiguousarray(_fp16(b, 0)))


def kept(data: np.ndarray, type_name: str, shape: tuple[int, int], where: str = "tensor") -> dict:
    """{stored name suffix: tensor} of one kept-quantized weight (QuantLinear's buffers)."""
    if type_name == "Q8_0":
        q, scale = q8_to_int8(data, shape, where)
        return {"weight_int8": q, "weight_scale": scale}
    packed, scales_zeros = q4_to_int4(data, type_name, shape, where)
    return {"weight_int4": packed, "weight_scales_zeros": scales_zeros}
