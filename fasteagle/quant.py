"""Quantized linear weights for the target: int8 (per output channel) and int4 (grouped), stored device-independently.

Stored formats (checkpoint tensors, under each projection's name; config.json says {"quantization": {"mode",
"group_size"}}):
  int8  weight_int8 [out, in] int8, weight_scale [out] fp32; symmetric: w = q * scale, q in [-127, 127]. Stored
        from a GGUF's Q8_0 blocks (convert gguf --keep-quantized): weight_scale [out, in // 32], one scale per
        group of 32 inputs ("group_size": 32), requantized per channel for the kernels when loaded.
  int4  weight_int4 [out, in // 2] uint8, weight_scales_zeros [in // group, out, 2] fp32 (scale, zero); asymmetric:
        w = (q - 8) * scale + zero, q in [0, 15]. Byte j of row n holds q[n, 2j] in its high nibble and q[n, 2j + 1]
        in its low one: the layout torch's CUDA `_convert_weight_to_int4pack` takes, as are the scales/zeros (bf16 there).
The LM head is quantized like the layers, or as the entry's optional "lm_head": {"mode", "group_size"} says (a
GGUF's Q8_0 table beside Q4 layers); a tied embedding is not stored: it is the LM head's dequantized table (one
table, as in the fp model). An untied embedding stays dense (each token reads one row of it).

How each device runs them (QuantLinear.prepare, once, after the model is on its device):
  CPU   the few-row GEMM kernel's int8 variant (fasteagle.kernels.skinny_gemm, path "skinny8"): the int8 weight
        blocked once, widened to fp32 in registers, fp32 activations and sums, the per-channel scale applied to each
        sum; any width, any number of rows (prefill included). An int4 checkpoint runs this way too, requantized
        per channel at load, as does a GGUF's Q8_0 (grouped) table: on a CPU int4 saves disk, not time. Measured
        over SmolLM2-135M's projections and LM head, 2 AVX-512 threads, ms per pass: 1 row 7.2 (fp32 kernel 20.3,
        torch's _weight_int8pack_mm 13.9), 4 rows 8.3 (20.6, 16.5), 8 rows 12.2 (22.3, 31.1).
        Where that kernel cannot be built (no C++ compiler), or for a bf16 / fp16 model (the kernel takes fp32
        activations), torch's weight-only `_weight_int8pack_mm` ("int8pack"):
        the activations rounded to bf16 for the call, fp32 sums, a bf16 result widened back; it takes inputs in
        blocks of 16 (other widths crash it), so a projection of another width multiplies by its dequantized weight.
        torch has no x86 int4 kernel faster than fp32 (measured on AVX2 at SmolLM2's shapes, one row:
        _weight_int4pack_mm_for_cpu 5-9x slower than fp32 and linear in the rows).
  int8  CUDA: `_weight_int8pack_mm` (the model's bf16 activations).
  int4  CUDA (sm80+): `_weight_int4pack_mm` (bf16 activations; the weight packed once by
        `_convert_weight_to_int4pack`). Shapes it cannot take (out % 8, in % 32) multiply by the dequantized weight.
  Other devices multiply by the dequantized weight, made once. torch.compile traces the same ops (the CPU kernel is
  a custom op).

Lossless with respect to the quantized model: speculative decoding needs the verify forward over N tree tokens to
compute, row for row, what N one-token steps compute. Both CPU kernels compute each row's sums by themselves, in
the same order whatever the batch (tests/test_quant.py checks it bit for bit). With the skinny kernel that is the
fp32 model's situation: only attention (a tree row reduces over its keys in another order than a one-token step)
differs in last bits, and nothing amplifies it. torch's int8pack kernel rounds its input to bf16, so there a
last-bit difference moves a rounding and grows: over 30 layers SmolLM2's logits drifted ~0.03 apart (measured: 9 of
40 EAGLE-2 answers left the quantized model's own AR). So a quantized target on that path keeps its KV cache and
computes attention in fp64 (Transformer.kv_dtype, set by prepare_model; ~1 ms more on a 3-row SmolLM2 verify at
600 keys) and rounds the result to fp32: a row's keys, the same in both, give the same fp32 numbers unless an fp64
sum lands within its ~1e-16 rounding difference of an fp32 rounding boundary (odds ~1e-8 per number; not seen in
tests or bench). Greedy output then equals the quantized model's own AR output, token for token, and sampling
follows its distribution. On a GPU (bf16 throughout) equality is judged by margins, as for any bf16 model
(design.md).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fasteagle.errors import FastEagleError
from fasteagle.kernels.skinny_gemm import skinny_linear_int8
from fasteagle.linear import FusedInput, Linear, quantize_int8, skinny_available

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)  # what _weight_int4pack_mm takes (it also takes 256)
DEFAULT_GROUP_SIZE = 32  # measured on SmolLM2: 32 keeps 87% top-1 agreement with fp32, 64 only 60%
CPU_BLOCK = 16  # the CPU int8 kernel reads inputs in blocks of 16


# --- stored formats ----------------------------------------------------------------------------------------------


def quantize_int4(w: torch.Tensor, group_size: int):
    """[out, in] -> (packed uint8 [out, in // 2], scales_zeros fp32 [in // group, out, 2]), w ~= (q - 8) * s + z per
    group of group_size inputs (min/max: q = 0 is the group's min, q = 15 its max)."""
    out, n_in = w.shape
    g = w.detach().float().reshape(out, n_in // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(out, n_in)
    packed = (q[:, 0::2] << 4) | q[:, 1::2]
    return packed, torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in // 2] -> the codes [out, in] (uint8, 0..15)."""
    return torch.stack([packed >> 4, packed & 15], -1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales_zeros: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The [out, in] weight quantize_int4's (packed, scales_zeros) stand for, in dtype."""
    q = unpack_int4(packed)
    out, n_in = q.shape
    sz = scales_zeros.transpose(0, 1).to(dtype)  # [out, groups, 2]
    g = q.reshape(out, sz.shape[1], -1).to(dtype)
    return ((g - 8) * sz[..., :1] + sz[..., 1:]).reshape(out, n_in)


# --- kernels -----------------------------------------------------------------------------------------------------


def int4_inner_k_tiles(in_features: int, out_features: int) -> int | None:
    """The widest k-tiling _convert_weight_to_int4pack allows for this shape (in % (16 * tiles) == 0, out % 8 == 0),
    None where it has none."""
    if out_features % 8:
        return None
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


# --- the module --------------------------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """y = x W^T + b, W stored quantized (the module docstring's formats). prepare() picks the device's kernel."""

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: int | None = None,
                 bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        if mode == "int8":
            self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.empty(
                (out_features,) if group_size is None else (out_features, in_features // group_size)))
        else:
            self.register_buffer("weight_int4", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("weight_scales_zeros", torch.empty(in_features // group_size, out_features, 2))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)
        self.path, self.dense = "dequantize", None  # prepare() sets the device's path; this one runs anywhere

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, group_size: int | None = None):
        out, n_in = weight.shape
        stored = quantize_int8(weight) if mode == "int8" else quantize_int4(weight, group_size)
        return cls._of(n_in, out, mode, group_size, stored, None if bias is None else bias.detach().clone())

    @classmethod
    def _of(cls, in_features, out_features, mode, group_size, stored, bias):
        with torch.device("meta"):
            m = cls(in_features, out_features, mode, group_size, bias is not None)
        for name, t in zip(m.stored_names() + ("bias",), stored + (bias,)):
            setattr(m, name, t)
        return m

    def stored_names(self) -> tuple[str, str]:
        return ("weight_int8", "weight_scale") if self.mode == "int8" else ("weight_int4", "weight_scales_zeros")

    @classmethod
    def stack(cls, mods: list["QuantLinear"]) -> "QuantLinear":
        """One module computing [m(x) for m in mods] concatenated (they read the same input): their rows stacked.
        The members' stored tensors become views of the stack's, so the weights are held once."""
        first = mods[0]
        names = first.stored_names() + (("bias",) if first.bias is not None else ())
        dims = {"weight_scales_zeros": 1}  # [groups, out, 2]; the others have out first
        stacked = [torch.cat([getattr(m, n) for m in mods], dims.get(n, 0)) for n in names]
        for n, whole in zip(names, stacked):
            for m, part in zip(mods, whole.split([m.out_features for m in mods], dims.get(n, 0))):
                setattr(m, n, part)
        bias = stacked[2] if first.bias is not None else None
        return cls._of(first.in_features, sum(m.out_features for m in mods), first.mode, first.group_size,
                       tuple(stacked[:2]), bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] (in the scales' dtype): what the quantized model multiplies by."""
        if self.mode == "int8" and self.group_size is None:
            return self.weight_int8.to(self.weight_scale.dtype) * self.weight_scale[:, None]
        if self.mode == "int8":
            q = self.weight_int8.to(self.weight_scale.dtype).view(self.out_features, -1, self.group_size)
            return (q * self.weight_scale[..., None]).view(self.out_features, self.in_features)
        return dequantize_int4(self.weight_int4, self.weight_scales_zeros, self.weight_scales_zeros.dtype)

    def per_channel_int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [out, in], scale [out]): the stored weight if it is per-channel int8, else requantized."""
        if self.mode == "int8" and self.group_size is None:
            return self.weight_int8, self.weight_scale
        return quantize_int8(self.weight)

    def prepare(self):
        """Make the device's runtime copies (plain attributes, not saved): call after the module is on its device."""
        dev = self.weight_int8.device if self.mode == "int8" else self.weight_int4.device
        self.path, self.dense = "dequantize", None
        float_dtype = (self.weight_scale if self.mode == "int8" else self.weight_scales_zeros).dtype
        if dev.type == "cpu" and float_dtype == torch.float32 and skinny_available():  # int8, or int4 requantized
            from fasteagle.kernels.skinny_gemm import block

            self.path = "skinny8"
            q, scale = self.per_channel_int8()
            self.int8 = (block(q), scale.float().contiguous())
        elif (self.mode == "int8" and dev.type == "cuda") or (
                dev.type == "cpu" and self.in_features % CPU_BLOCK == 0):  # int8, or int4 requantized on a CPU
            self.path = "int8pack"
            q, scale = self.per_channel_int8()
            self.act_dtype = torch.bfloat16 if dev.type == "cpu" else self.weight_scale.dtype  # CUDA: the model's
            self.int8 = (q.contiguous(), scale.to(self.act_dtype))
        elif dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 0) and (
                tiles := int4_inner_k_tiles(self.in_features, self.out_features)):
            self.path = "int4pack"
            self.int4pack = torch.ops.aten._convert_weight_to_int4pack(self.weight_int4.contiguous(), tiles)
            self.int4_scales_zeros = self.weight_scales_zeros.to(torch.bfloat16).contiguous()
        else:
            self.dense = self.weight
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.path == "skinny8":  # the bias added in the kernel
            return skinny_linear_int8(x, *self.int8, self.bias, self.out_features)
        if self.path == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(self.act_dtype).contiguous(), *self.int8).to(x.dtype)
        elif self.path == "int4pack":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.int4pack,
                                                   self.group_size, self.int4_scales_zeros).to(x.dtype)
        else:
            y = F.linear(x2, (self.dense if self.dense is not None else self.weight).to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}{group}"


# --- whole models ------------------------------------------------------------------------------------------------


def check_settings(model, mode: str, group_size: int | None) -> int | None:
    """The group size to use (int4: DEFAULT_GROUP_SIZE unless given; int8: None); FastEagleError unless every
    projection of model can take this mode and group size."""
    group_size = check_mode(model, mode, group_size)
    if group_size:
        check_groups(model, group_size, mode)
    return group_size


def check_mode(model, mode: str, group_size: int | None, stored: bool = False) -> int | None:
    """The checked group size of a mode (int4's default filled in). stored: a checkpoint's entry, where int8 may come
    in groups too (GGUF Q8_0)."""
    if mode not in MODES:
        raise FastEagleError(f"unknown quantization mode {mode!r} (int8 or int4)")
    if model.args.n_experts:
        raise FastEagleError("quantizing a mixture-of-experts target is not supported (its experts are not Linears)")
    if mode == "int8" and (group_size is None or not stored):
        if group_size is not None:
            raise FastEagleError("a group size applies to int4 only (int8 has one scale per output channel)")
        return None
    if mode == "int4" and group_size is None and stored:
        raise FastEagleError("int4 without a group size")
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise FastEagleError(f"{mode} group size {group_size}: must be one of {', '.join(map(str, GROUP_SIZES))}")
    return group_size


def check_groups(model, group_size: int, mode: str = "int4", layers: bool = True, lm_head: bool = True):
    """FastEagleError unless group_size divides the input width of every projection (layers) / of the LM head."""
    widths = {f"layers.{i}.{name}": lin.in_features for i, layer in enumerate(model.layers)
              for name, lin in _projections(layer)} if layers else {}
    for name, width in {**widths, **({"the LM head": model.args.dim} if lm_head else {})}.items():
        if width % group_size:
            raise FastEagleError(f"{mode} group size {group_size} does not divide the {width} input features of {name}")


def _projections(layer) -> list[tuple[str, Linear]]:
    """(name within layer, Linear) of a layer's projections: q, k, v, o, gate, up, down."""
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, Linear)]


def _replace(root: nn.Module, name: str, module: nn.Module):
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent), attr, module)


def _quantized_lm_head(model, head: "QuantLinear", quantization: dict):
    """The LM head becomes `output` (untied or not); a tied embedding becomes a plain, unsaved buffer that
    prepare_model fills with the LM head's dequantized table."""
    model.output = head
    if model.args.tie_embeddings:
        w = model.embed.weight
        del model.embed.weight
        model.embed.register_buffer("weight", w.detach(), persistent=False)
    model.quantization = quantization


def quantize_model(model, mode: str, group_size: int | None = None, progress=lambda layers: layers):
    """Quantize a fp target in place: its projections and LM head (check_settings first). progress wraps the list of
    layers (a progress bar). Call prepare_model once the model is on its device."""
    group_size = check_settings(model, mode, group_size)
    with torch.no_grad():
        for layer in progress(list(model.layers)):
            for name, lin in _projections(layer):
                _replace(layer, name, QuantLinear.quantize(lin.weight, lin.bias, mode, group_size))
        head = QuantLinear.quantize(model.lm_head_weight(), None, mode, group_size)
    _quantized_lm_head(model, head, {"mode": mode, "group_size": group_size})
    return model


def quantized_skeleton(model, quantization, where: str = "config"):
    """Give a freshly built target (e.g. on the meta device) empty QuantLinear modules of a stored quantization
    entry (checked; errors name `where`), so that the quantized checkpoint loads into it (checkpoint.load_weights)."""
    if not isinstance(quantization, dict) or not isinstance(quantization.get("lm_head", {}), dict):
        raise FastEagleError(f"{where}: bad quantization entry {quantization!r}")
    mode, group_size = quantization.get("mode"), quantization.get("group_size")
    head = quantization.get("lm_head", {"mode": mode, "group_size": group_size})
    try:
        for m, g, layers in ((mode, group_size, True), (head.get("mode"), head.get("group_size"), False)):
            if check_mode(model, m, g, stored=True):
                check_groups(model, g, m, layers=layers, lm_head=not layers)
    except FastEagleError as e:
        raise FastEagleError(f"{where}: bad quantization entry: {e}") from None
    for layer in model.layers:
        for name, lin in _projections(layer):
            _replace(layer, name, QuantLinear(lin.in_features, lin.out_features, mode, group_size,
                                              lin.bias is not None))
    lm_head = QuantLinear(model.args.dim, model.args.vocab_size, head["mode"], head.get("group_size"))
    _quantized_lm_head(model, lm_head, dict(quantization))
    return model


def prepare_model(model):
    """Once the quantized model is on its device and dtype: fill the tied embedding from the LM head, give each
    FusedInput group one stacked module (q/k/v, gate/up: one call each, as the fp CPU path packs them) and every
    module its kernel's copies (QuantLinear.prepare)."""
    if model.args.tie_embeddings:
        model.embed.weight = model.output.weight.to(model.norm.weight.dtype)
    grouped = set()
    for m in model.modules():
        if isinstance(m, FusedInput):
            object.__setattr__(m, "group_linear", QuantLinear.stack(m.group()).prepare())  # not a submodule: unsaved
            grouped.update(m.group())
    for m in list(model.modules()):
        if isinstance(m, QuantLinear) and m not in grouped:
            m.prepare()
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)] + [
        m.group_linear for m in model.modules() if isinstance(m, FusedInput)]
    if any(m.path == "int8pack" and m.int8[0].device.type == "cpu" for m in linears):
        model.kv_dtype = torch.float64  # bf16-rounded activations: row-independent attention (module docstring)
        if model.max_seq_len:  # a cache set up before: again, in that dtype
            model.setup_cache(model.max_seq_len, attn_backend=model.attn_backend)
    return model
