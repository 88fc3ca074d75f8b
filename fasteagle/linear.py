"""Linear layers with CPU fast paths: few-row weights packed once (the skinny GEMM kernel's blocked copies, else
oneDNN's), int8 copies through fbgemm, and FusedInput, which runs the projections that read one input (q/k/v,
gate/up) as one call. Off CPU, or while compiling, every layer here is a plain nn.Linear."""
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


class Linear(nn.Linear):
    """nn.Linear, plus optional CPU fast paths (both opt-in, set by the engine on CPU):

    - packed: at batch 1 a CPU step streams every weight from memory; MKL's GEMM for a few rows repacks each weight
      on every call and costs about twice its GEMV (measured on 2 AVX2 cores: 8 rows ~2.6x one row over SmolLM2's
      weights). `pack_linears` gives each layer a copy of its weight packed once (pack_weight): the skinny GEMM
      kernel's blocked layout (fasteagle.kernels.skinny_gemm: up to 32 rows in one pass over the weight, 8 rows
      ~1.25x one row, one row faster than MKL's sgemv), or where that kernel cannot be built, oneDNN's (8 rows
      ~1.5x one row). Doubles the weights' memory.
    - qpacked: an int8 copy (quantize_linears), for the draft head only (quantize_weight)."""

    packed = None  # oneDNN-packed weight (plain attribute: not saved, not moved)
    qpacked = None  # int8 copy (quantize_linears; fbgemm's or the skinny kernel's kind): used for every input

    def forward(self, x):
        if self.qpacked is not None:
            return quantized_linear(x, self.qpacked)
        return packed_linear(x, self.weight, self.packed, self.bias)


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


# pack for the skinny GEMM kernel where it builds; FASTEAGLE_CPU_GEMM=onednn: oneDNN's packing only
USE_SKINNY = os.environ.get("FASTEAGLE_CPU_GEMM", "skinny") != "onednn"


def skinny_available() -> bool:
    if not USE_SKINNY:
        return False
    from fasteagle.download import cache_dir
    from fasteagle.kernels import skinny_gemm

    return skinny_gemm.load(cache_dir())


def pack_weight(weight: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """The packed copy of a [out, in] fp32 CPU weight: blocked for the skinny GEMM kernel (a 3-D tensor), or where
    that is unavailable oneDNN's, tuned for inputs of `rows` rows."""
    if skinny_available():
        from fasteagle.kernels.skinny_gemm import block

        return block(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def is_skinny(packed: torch.Tensor | None) -> bool:
    return packed is not None and packed.dim() == 3


def for_each_weight(model: nn.Module, can, on_group, on_single) -> bool:
    """The walk pack_linears and quantize_linears share: unless can(a weight) says the fast path does not apply
    (returns False then), on_group(m) for every FusedInput m, then on_single(m) for every Linear outside a group."""
    mods = [m for m in model.modules() if isinstance(m, Linear)]
    if not mods or not can(mods[0].weight):
        return False
    grouped = set()
    for m in model.modules():
        if isinstance(m, FusedInput):
            on_group(m)
            grouped.update(m.group())
    for m in mods:
        if m not in grouped:
            on_single(m)
    return True


def pack_linears(model: nn.Module, rows: int = 8) -> bool:
    """Give every `Linear` of model a packed weight (see Linear), the projections that read the same input (an
    attention's wq, wk, wv; a feed-forward's gate and up) one packed weight per group (FusedInput); False (nothing
    done) off CPU / fp32 / oneDNN."""
    def single(m):
        if m.packed is None:
            m.packed = pack_weight(m.weight, rows)

    return for_each_weight(model, can_pack, lambda m: m.pack_group(rows), single)


PACKED_ONE_ROW_MIN_THREADS = 2
# {threads: fewest rows that take the packed weight}, measured on this machine by measure_packed_rows; without a
# measurement: 1 row from PACKED_ONE_ROW_MIN_THREADS threads on, else 2
PACKED_MIN_ROWS: dict[int, int] = {}


def packed_min_rows() -> int:
    threads = torch.get_num_threads()
    return PACKED_MIN_ROWS.get(threads, 1 if threads >= PACKED_ONE_ROW_MIN_THREADS else 2)


def use_packed(x: torch.Tensor, packed: torch.Tensor | None) -> bool:
    """Whether a CPU linear on x takes its packed weight.
    Blocked (skinny kernel): for inputs of up to skinny_gemm.MAX_ROWS rows, one row included (a decode step and a
    verify row then agree bit for bit); longer ones (prefill) take MKL. Compiled graphs call it too (a custom op).
    oneDNN: eager only (inductor: the plain linear), from packed_min_rows() rows on.
    Which is faster for few rows there depends on the CPU: on 2 AVX2 cores (AMD) oneDNN's packed GEMV beat MKL's
    sgemv with 2 threads and lost with 1; on 2 AVX-512 cores (Intel) MKL's sgemv is ~20% faster at one or two rows
    and the packed GEMM faster from four."""
    if packed is None:
        return False
    rows = x.numel() // x.shape[-1]
    if is_skinny(packed):
        from fasteagle.kernels.skinny_gemm import MAX_ROWS

        return rows <= MAX_ROWS
    return not torch.compiler.is_compiling() and rows >= packed_min_rows()


def packed_only(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    """x @ weight.T + bias through the packed copy (see use_packed)."""
    if is_skinny(packed):
        from fasteagle.kernels.skinny_gemm import skinny_linear

        return skinny_linear(x, packed, bias, out_features)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packed_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the packed copy when use_packed says so."""
    if use_packed(x, packed):
        return packed_only(x, packed, bias, weight.shape[0])
    return F.linear(x, weight, bias)


class FusedInput(nn.Module):
    """A module whose `group()` of Linears all read the same input. On CPU the group gets one packed weight
    (pack_linears) or one int8 copy (quantize_linears), their rows stacked: one call instead of three (q, k, v) or
    two (gate, up). Each call has a fixed cost (~50-80 us on 2 cores) that dominates SmolLM2's small GEMMs, more so
    for the few-row inputs of tree verification (measured on SmolLM2-135M, 2 threads: verify(3) 1.21x -> 1.13x the
    one-token step). The members keep their own weights: checkpoints, GPU and compiled forwards are unchanged."""

    group_packed = None  # [sum of the group's out features, in], oneDNN-packed (pack_group); plain attribute
    group_qpacked = None  # the same rows as int8 (quantize_group)
    group_bias = None
    group_linear = None  # a quantized target's stacked projection (quant.prepare_model), used on every device

    def group(self) -> list[Linear]:
        raise NotImplementedError

    def _stacked(self):
        mods = self.group()
        bias = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
        return torch.cat([m.weight.detach() for m in mods]), bias

    def pack_group(self, rows: int):
        if self.group_packed is None:
            w, self.group_bias = self._stacked()
            self.group_packed = pack_weight(w, rows)

    def quantize_group(self, min_numel: int, weight_only: bool = False):
        w, bias = self._stacked()
        if self.group_qpacked is None and w.numel() >= min_numel:
            self.group_qpacked = quantize_weight(w, bias, weight_only)

    def group_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[m(x) for m in group()], in one call when there is a stacked copy to take (int8 first)."""
        mods = self.group()
        if self.group_linear is not None:
            y = self.group_linear(x)
        elif self.group_qpacked is not None:
            y = quantized_linear(x, self.group_qpacked)
        elif use_packed(x, self.group_packed):
            y = packed_only(x, self.group_packed, self.group_bias, sum(m.out_features for m in mods))
        else:
            return [m(x) for m in mods]
        return y.split([m.out_features for m in mods], dim=-1)


def can_quantize(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.quantized.engine in ("x86", "fbgemm"))


def quantize_int8(w: torch.Tensor):
    """[out, in] -> (q int8 [out, in], scale fp32 [out]), w ~= q * scale per output channel."""
    w = w.detach().float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def quantize_weight(weight: torch.Tensor, bias: torch.Tensor | None = None, weight_only: bool = False):
    """An int8 copy of a [out, in] fp32 CPU weight (one scale per output row), for the draft head only, whose
    output just proposes tokens (verification by the fp32 target keeps generation lossless). A quarter of the fp32
    weight's bytes, so a memory-bound CPU GEMV runs ~2-5x faster, at ~1-2% relative error. Two kinds:
    - default: prepacked for torch's dynamic quantized linear (fbgemm): activations are quantized per call,
      products accumulate in int32 (VNNI). Eager only: a compiled graph cannot trace the op.
    - weight_only: (blocked q, scale, bias, out_features) for the skinny kernel's int8 variant
      (kernels/skinny_gemm.py; needs skinny_available()): the weight is widened to fp32 in registers and the
      activations stay fp32. A custom op, so compiled graphs call it too."""
    if weight_only:
        from fasteagle.kernels.skinny_gemm import block

        q, scale = quantize_int8(weight)
        return block(q), scale.contiguous(), None if bias is None else bias.detach(), weight.shape[0]
    w = weight.detach()
    scale = (w.abs().amax(1).double() / 127).clamp(min=1e-12)
    with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; the op itself is the supported
        warnings.simplefilter("ignore")  # path to fbgemm's int8 GEMM
        q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach())


def quantized_linear(x: torch.Tensor, qpacked) -> torch.Tensor:
    if is_weight_only(qpacked):
        from fasteagle.kernels.skinny_gemm import skinny_linear_int8

        return skinny_linear_int8(x, *qpacked)
    return torch.ops.quantized.linear_dynamic(x, qpacked, True)


def is_weight_only(qpacked) -> bool:
    """Whether an int8 copy from quantize_weight is the weight-only kind (a tuple; fbgemm's is a packed object)."""
    return isinstance(qpacked, tuple)


QUANTIZE_MIN_NUMEL = 1 << 16


def quantize_linears(model: nn.Module, min_numel: int = QUANTIZE_MIN_NUMEL, keep_fp32=(),
                     weight_only: bool = False) -> bool:
    """Give every `Linear` of model with at least min_numel weights an int8 copy (quantize_weight, of the kind
    weight_only says, replacing copies of the other kind), used for all its inputs from then on; a FusedInput's
    group gets one stacked copy instead. Smaller weights stay fp32: the dynamic op's per-call quantization costs
    more than the bytes it saves there (measured: a 64 x 32 weight takes 44 us in int8 vs 8 us in fp32). So do the
    Linears in keep_fp32: those whose input mixes scales that one per-call activation scale cannot hold. Returns
    whether any weight was quantized. dequantize_linears undoes it."""
    if any(is_weight_only(q) != weight_only for q in int8_copies(model)):
        dequantize_linears(model)

    def single(m):
        if m.qpacked is None and m.weight.numel() >= min_numel and not any(m is k for k in keep_fp32):
            m.qpacked = quantize_weight(m.weight, m.bias, weight_only)

    can = skinny_usable if weight_only else can_quantize
    if not for_each_weight(model, can, lambda m: m.quantize_group(min_numel, weight_only), single):
        return False
    return any(isinstance(m, Linear) and m.qpacked is not None or isinstance(m, FusedInput)
               and m.group_qpacked is not None for m in model.modules())


def int8_copies(model: nn.Module) -> list:
    """The int8 copies quantize_linears gave model's layers."""
    return [q for m in model.modules() for q in (getattr(m, "qpacked", None), getattr(m, "group_qpacked", None))
            if q is not None]


def skinny_usable(weight: torch.Tensor) -> bool:
    """Whether a weight can take the skinny kernel's weight-only int8 copy (fp32 on a CPU where the kernel builds)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and skinny_available()


def dequantize_linears(model: nn.Module):
    """Drop the int8 copies quantize_linears made."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.qpacked = None
        if isinstance(m, FusedInput):
            m.group_qpacked = None


STREAM_BYTES = 96 << 20  # more weight bytes than a CPU's last-level cache: timings that stream from memory, as a step


@torch.no_grad()
def measure_packed_rows(model: nn.Module, max_rows: int = 4, reps: int = 3) -> int:
    """Time few-row passes over `model`'s packed projections both ways (MKL on the plain weights, member by member;
    oneDNN on the packed copy, a FusedInput's group in one call), over the first ones up to STREAM_BYTES of weights
    so that they stream from memory as in a real step, and record in PACKED_MIN_ROWS the fewest rows from which the
    packed path is faster (max_rows when it is not below that). About 0.1 s for SmolLM2-135M. Returns it."""
    import time

    units, total = [], 0  # (in_features, plain weights and biases, packed weight, packed bias)
    for m in model.modules():
        if total >= STREAM_BYTES:
            break
        if isinstance(m, FusedInput) and m.group_packed is not None and not is_skinny(m.group_packed):
            members = m.group()
            units.append((members[0].in_features, [(g.weight, g.bias) for g in members], m.group_packed, m.group_bias))
        elif isinstance(m, Linear) and m.packed is not None and not is_skinny(m.packed):
            units.append((m.in_features, [(m.weight, m.bias)], m.packed, m.bias))
        else:
            continue
        total += sum(w.numel() * w.element_size() for w, _ in units[-1][1])
    if not units:
        return packed_min_rows()
    best = max_rows
    for rows in range(max_rows - 1, 0, -1):
        x = {n: torch.randn(1, rows, n) for n, *_ in units}
        t = {"plain": float("inf"), "packed": float("inf")}
        for _ in range(reps):
            for kind in t:
                t0 = time.perf_counter()
                for n, plain, packed, bias in units:
                    if kind == "plain":
                        for w, b in plain:
                            F.linear(x[n], w, b)
                    else:
                        torch.ops.mkldnn._linear_pointwise(x[n], packed, bias, "none", [], "")
                t[kind] = min(t[kind], time.perf_counter() - t0)
        if t["packed"] > t["plain"]:
            break
        best = rows
    PACKED_MIN_ROWS[torch.get_num_threads()] = best
    return best
