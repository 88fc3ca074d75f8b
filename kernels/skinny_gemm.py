"""A CPU GEMM for few-row fp32 inputs (decode steps, tree verification, draft levels), with its PyTorch reference;
fp32 or int8 weights.

    blocked = block(weight)                                # once: [out, in] -> [ceil(out/16), in, 16]
    y = skinny_linear(x, blocked, bias, weight.shape[0])   # = F.linear(x, weight, bias), x: [..., in], few rows
    y = skinny_linear_int8(x, block(q), scale, bias, out)  # = F.linear(x, q * scale[:, None], bias), q int8

At batch 1 a CPU step streams every weight from memory once, so a tree verification of m rows should cost about
one decode step. MKL's sgemm for a few rows repacks each weight on every call, and oneDNN's prepacked GEMM still
costs ~1.5x its one-row GEMV at 8 rows (SmolLM2-135M's weights, 2 AVX-512 cores). skinny_gemm.cpp reads each
weight block once for all rows, with every output summed over `in` in order, one FMA at a time, whatever the number
of rows (a row's output does not depend on the others: the decode step and a verify row agree bit for bit).
Measured over all of SmolLM2-135M's projections and LM head (2 threads, ms per pass): 1 row 23.6 (MKL sgemv 26.6),
4 rows 27.0 (oneDNN 40.4), 8 rows 29.8 (45.6), 16 rows 40.4 (53.4), 32 rows 62.7 (72.9); at 64 rows oneDNN and MKL
are as fast, so callers keep those for prefill (MAX_ROWS).

The int8 variant reads int8 weights blocked the same way (a quarter of the bytes), widens them to fp32 in
registers and sums in the same order; the per-output-channel scale multiplies each sum once. Activations stay fp32
(torch's _weight_int8pack_mm rounds them to bf16 on a CPU). It takes any number of rows: a quantized target's
prefill goes through it too, so there is no dense copy of the weights. Same passes, ms: 1 row 7.2, 4 rows 8.3,
8 rows 12.2, 32 rows 41.3 (fp32 kernel: 20.3 / 20.6 / 22.3 / 48.7). Once the int8 weights fit in the last-level
cache (SmolLM2's 135 MB do on a 260 MB L3) it is bound by arithmetic, not memory: widening each weight vector, one
FMA per row.

The C++ source is compiled once per machine by the system's C++ compiler against the installed torch
(-O3 -march=native, OpenMP through torch's own thread pool: torch.set_num_threads applies), into
$FASTEAGLE_CACHE/kernels (about 10 s), and loaded as the custom op torch.ops.fasteagle_cpu.skinny_linear, which
(and ..._int8), which torch.compile graphs call as well (its output shape is registered for tracing). load() says whether it is available;
without a compiler it warns once and callers keep their other paths.
"""
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("skinny_gemm.cpp")
BLOCK = 16  # output columns per weight block (one 64-byte vector of fp32)
MAX_ROWS = 32  # inputs with more rows go to MKL / oneDNN (see the measurements above)


def block(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [ceil(out / 16), in, 16], int8 kept, other dtypes as fp32: block g holds output columns
    16g..16g+15 (zero-padded), each input feature's 16 weights side by side."""
    w = weight.detach()
    w = w if w.dtype == torch.int8 else w.float()
    pad = -w.shape[0] % BLOCK
    if pad:
        w = torch.cat([w, w.new_zeros(pad, w.shape[1])])
    return w.view(-1, BLOCK, w.shape[1]).transpose(1, 2).contiguous()


def skinny_linear_reference(x, weight, bias=None):
    return F.linear(x, weight, bias)


def skinny_linear_int8_reference(x, q, scale, bias=None):
    y = F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias


def skinny_linear(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    """F.linear(x, weight, bias) from block(weight); x fp32 on CPU. Needs load()."""
    return torch.ops.fasteagle_cpu.skinny_linear(x, blocked, bias, out_features)


def skinny_linear_int8(x: torch.Tensor, blocked: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       out_features: int):
    """F.linear(x, q * scale[:, None], bias) from block(q) (q int8 [out, in], scale fp32 [out]); x fp32 on CPU, any
    number of rows. Needs load()."""
    return torch.ops.fasteagle_cpu.skinny_linear_int8(x, blocked, scale, bias, out_features)


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _command(cxx: str, src: Path, out: Path) -> list[str]:
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [cxx, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{root / 'include'}",
            f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", str(src), "-o", str(out),
            f"-L{root / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{root / 'lib'}"]


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model name and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "|".join(next((ln for ln in lines if ln.startswith(k)), "") for k in ("model name", "flags"))


def library_path(cache_dir: Path, cxx: str) -> Path:
    """Where the build for this source, compiler, torch and CPU lives."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = "|".join([SOURCE.read_text(), " ".join(_command(cxx, SOURCE, Path("x"))), version, torch.__version__,
                    _cpu_id()])
    return Path(cache_dir) / "kernels" / f"skinny_gemm-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def build(cache_dir: Path) -> Path:
    """Compile skinny_gemm.cpp into cache_dir/kernels unless that build exists; the file appears whole or not at all
    (compiled to a temporary name, then renamed). Raises RuntimeError with the compiler's message on failure."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    out = library_path(cache_dir, cxx)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print("[set-up: compiling the CPU few-row GEMM kernel, once per machine (~10 s)]", file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run(_command(cxx, SOURCE, Path(tmp)), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {(done.stderr or done.stdout).strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _fake(x, blocked, bias, out_features):  # the output's shape, for torch.compile's tracing
    return x.new_empty((*x.shape[:-1], out_features))


def _fake_int8(x, blocked, scale, bias, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


_loaded: dict[str, bool] = {}


def load(cache_dir: Path) -> bool:
    """Build (once per machine) and load the kernel; whether torch.ops.fasteagle_cpu.skinny_linear is available.
    On failure: one warning per process naming the cause, and False."""
    if "ok" not in _loaded:
        try:
            torch.ops.load_library(str(build(cache_dir)))
            torch.library.register_fake("fasteagle_cpu::skinny_linear", _fake)
            torch.library.register_fake("fasteagle_cpu::skinny_linear_int8", _fake_int8)
            _loaded["ok"] = True
        except (RuntimeError, OSError) as e:
            warnings.warn(f"fasteagle: the CPU few-row GEMM kernel is unavailable ({e}); using MKL / oneDNN")
            _loaded["ok"] = False
    return _loaded["ok"]
