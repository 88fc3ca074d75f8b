"""Small helpers shared by the Triton kernels: interpreter detection, autotune-or-fixed launching, SM count.

Under TRITON_INTERPRET=1 (CPU tests) `triton.jit` returns an interpreted function; the kernels then run on CPU
tensors with one fixed config each (autotuning under the interpreter would only multiply the runtime). On a GPU the
same kernels are wrapped in `triton.autotune` over a plainly listed config list.
"""
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


# Decided once at import: `triton.jit` picks the interpreter from TRITON_INTERPRET when a kernel is decorated,
# so every kernel module imported in the same process makes the same choice as this probe.
INTERPRET = type(_probe).__name__ == "InterpretedFunction"


# The interpreter's tl.dot multiplies bf16 operands as their raw uint16 bit patterns (triton 3.9), so under the
# interpreter `dot` upcasts its operands to fp32 first: the same exact products and fp32 accumulation that the
# tensor cores give bf16/fp16 inputs. On a GPU the operands go to tl.dot unchanged.
_UPCAST_DOT = tl.constexpr(INTERPRET)


@triton.jit
def dot(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation; PREC is tl.dot's input_precision (see dot_precision)."""
    if _UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


def use_kernels(t: torch.Tensor) -> bool:
    """Whether to run the Triton kernels on this tensor's device: always on CUDA; on CPU only under the
    interpreter. Otherwise the public wrappers run the PyTorch reference (what the engine uses on CPU)."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a static property: no sync). CPU/interpreter: a small
    stand-in so that split heuristics still produce several splits in tests."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products ("ieee"), matching the PyTorch references; fp16/bf16: tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


class Launcher:
    """`kernel[grid](*args, **kwargs)` that autotunes over `configs` on a GPU and uses `interp_config` under
    the interpreter. `key` names kernel arguments (runtime or constexpr) whose values select a tuning entry."""

    def __init__(self, fn, configs: list, key: list, interp_config: triton.Config):
        self.interpreted = type(fn).__name__ == "InterpretedFunction"
        if self.interpreted:
            self.fn, self.fixed = fn, dict(interp_config.kwargs)
        else:
            self.fn, self.fixed = triton.autotune(configs=configs, key=key)(fn), {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self.fn[grid](*args, **kwargs, **self.fixed)

        return launch
