"""Hugging Face model directory (Llama / Mistral / Mixtral / Qwen2 / Qwen3 family) -> fasteagle checkpoint.

HF q/k projections already use the rotate-half rope layout model.py uses, so weights are only renamed (and cast;
Mixtral's per-expert projections are stacked into one [E, ...] tensor each); the work here is reading every storage
variant and validating the config."""
import json
import re
import struct
from pathlib import Path

import torch

from fasteagle.convert.common import check_args, check_out_dir, parse_dtype, progress, write_target
from fasteagle.errors import FastEagleError
from fasteagle.model import ModelArgs

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
MODEL_TYPES = {family: arch for arch, family in ARCHITECTURES.items()}

# HF name -> ours; {i} is the layer index.
_RENAMES = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"layers.\1.attn.wq.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"layers.\1.attn.wk.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"layers.\1.attn.wv.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"layers.\1.attn.wo.\2"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.(weight|bias)", r"layers.\1.mlp.w1.\2"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"layers.\1.mlp.w3.\2"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"layers.\1.mlp.w2.\2"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight", r"layers.\1.attn.\2.weight"),  # Qwen3
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", r"layers.\1.mlp.gate.weight"),  # Mixtral's router
]
_RENAMES = [(re.compile(p + "$"), r) for p, r in _RENAMES]
# Buffers some older checkpoints saved that carry no information.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# Mixtral's experts, one tensor each in HF checkpoints; stacked here into layers.{i}.mlp.w1/w2/w3 [E, ...].
_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def hf_name_to_ours(name: str) -> str | None:
    for pat, rep in _RENAMES:
        if pat.match(name):
            return pat.sub(rep, name)
    return None


def _rope(cfg: dict, where: str) -> tuple[float, dict | None]:
    """rope_theta and rope_scaling from either the transformers-5 `rope_parameters` or the older
    `rope_theta` + `rope_scaling` keys. Only the default and Llama-3.1 ("llama3") rope are implemented."""
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    rope_type = (scaling.get("rope_type") or scaling.get("type")) if scaling else None
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise FastEagleError(
            f"{where}: rope scaling type {rope_type!r} is not supported (supported: none/default, 'llama3')"
        )
    needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in needed if k not in scaling]
    if missing:
        raise FastEagleError(f"{where}: llama3 rope scaling is missing {', '.join(missing)}")
    return float(theta), {"rope_type": "llama3", **{k: scaling[k] for k in needed}}


def model_args_from_hf(cfg: dict, where: str) -> tuple[ModelArgs, dict]:
    """ModelArgs from an HF config.json dict; also returns notes for the checkpoint's "source" entry."""
    archs = cfg.get("architectures") or []
    if not archs and cfg.get("model_type") in MODEL_TYPES:  # a config saved without "architectures"
        archs = [MODEL_TYPES[cfg["model_type"]]]
    if not archs:
        raise FastEagleError(f"{where}: config.json names no architecture (no 'architectures' or known 'model_type')")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise FastEagleError(f"{where}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    family = ARCHITECTURES[arch]
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise FastEagleError(f"{where}: unsupported hidden_act {act!r} (the model implements SwiGLU with silu)")
    if cfg.get("mlp_bias"):
        raise FastEagleError(f"{where}: mlp_bias=true is not supported")
    if family in ("llama", "qwen3") and cfg.get("attention_bias"):
        raise FastEagleError(f"{where}: attention_bias=true is not supported (o_proj bias is not implemented)")
    try:
        dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or dim // n_heads
        theta, scaling = _rope(cfg, where)
        args = ModelArgs(
            vocab_size=int(cfg["vocab_size"]),
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(head_dim),
            intermediate_size=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            qkv_bias=family == "qwen2",
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=family == "qwen3",
            sliding_window=_sliding_window(cfg, family, int(cfg["num_hidden_layers"]), where),
            n_experts=int(cfg["num_local_experts"]) if family == "mixtral" else 0,
            n_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)),
            arch=family,
        )
    except KeyError as e:
        raise FastEagleError(f"{where}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise FastEagleError(f"{where}: bad value in config.json: {e}") from None
    check_args(args, where)

    return args, {"architecture": arch}


def _sliding_window(cfg: dict, family: str, n_layers: int, where: str) -> int | None:
    """The attention window every layer uses, or None (full attention), as transformers reads the config: Mistral
    and Mixtral apply `sliding_window` to all layers when set; Qwen2/3 only with use_sliding_window, to the layers
    from max_window_layers on (or as `layer_types` says). A mix of windowed and full layers is refused."""
    window = cfg.get("sliding_window")
    if family in ("llama",) or not window:
        return None
    if family in ("mistral", "mixtral"):
        return int(window)
    if not cfg.get("use_sliding_window"):
        return None
    types = cfg.get("layer_types") or ["sliding_attention" if i >= cfg.get("max_window_layers", n_layers)
                                       else "full_attention" for i in range(n_layers)]
    if all(t == "full_attention" for t in types):
        return None
    if any(t != "sliding_attention" for t in types):
        raise FastEagleError(f"{where}: layers mixing sliding-window and full attention are not supported "
                             f"(layer_types: {sorted(set(types))})")
    return int(window)


def _check_safetensors(path: Path):
    """Compare the file size with what the header promises, so truncation is reported as such."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FastEagleError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise FastEagleError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FastEagleError(f"{path}: corrupt safetensors header") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise FastEagleError(f"{path}: truncated safetensors file: the header needs {need} bytes, the file has {size}")


def _iter_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    _check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except SafetensorError as e:
        raise FastEagleError(f"{path}: cannot read safetensors file (corrupt?): {e}") from None


def _iter_torch_bin(path: Path):
    def load(mmap: bool):
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            state = load(mmap=True)  # big checkpoints: tensors stay on disk until converted
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = load(mmap=False)  # pre-zipfile torch.save format cannot be memory-mapped
    except Exception as e:  # torch raises RuntimeError / pickle / zip errors for damaged files
        raise FastEagleError(f"{path}: cannot read PyTorch checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict):
        raise FastEagleError(f"{path}: expected a state dict, found {type(state).__name__}")
    yield from state.items()


def weight_files(src: Path) -> list[Path]:
    """The weight files of an HF model dir: safetensors preferred, either single or sharded via *.index.json."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = src / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise FastEagleError(f"{index}: not a valid shard index ({e})") from None
            files = [src / f for f in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise FastEagleError(f"{index}: shard files missing: {', '.join(absent)}")
            return files
        if (src / single).is_file():
            return [src / single]
    raise FastEagleError(f"{src}: no weights found (expected model.safetensors or pytorch_model.bin, possibly sharded)")


def read_hf_state(src: Path, args: ModelArgs, dtype: torch.dtype) -> tuple[dict, dict]:
    """All tensors renamed to our module names and cast to dtype. Returns (state, our name -> HF name)."""
    state, origin = {}, {}
    unknown = []
    experts = {}  # our stacked name -> {expert index: tensor}, until all n_experts are there
    for path in weight_files(src):
        reader = _iter_safetensors(path) if path.suffix == ".safetensors" else _iter_torch_bin(path)
        for name, t in progress(reader, desc=f"reading {path.name}"):
            m = _EXPERT.match(name) if args.n_experts else None
            if m:
                ours = f"layers.{m[1]}.mlp.{m[3]}"
                if int(m[2]) >= args.n_experts:
                    raise FastEagleError(f"{src}: tensor {name} names expert {m[2]} of {args.n_experts}")
                got = experts.setdefault(ours, {})
                got[int(m[2])] = t.to(dtype)
                if len(got) == args.n_experts:  # stack as soon as complete: the per-expert copies are freed
                    state[ours] = torch.stack([got[j] for j in range(args.n_experts)])
                    origin[ours] = name.replace(f".experts.{m[2]}.", ".experts.*.")
                    del experts[ours]
                continue
            ours = hf_name_to_ours(name)
            if ours is None:
                if not _IGNORED.match(name):
                    unknown.append(name)
                continue
            if ours == "output.weight" and args.tie_embeddings:
                continue  # tied head: some checkpoints store a copy of the embedding; the model reuses embed
            state[ours], origin[ours] = t.to(dtype), name
    if unknown:
        raise FastEagleError(f"{src}: unexpected tensors for {args.arch}: {', '.join(unknown[:8])}")
    for ours, got in experts.items():
        missing = sorted(set(range(args.n_experts)) - set(got))
        raise FastEagleError(f"{src}: {ours}: the weights of experts {missing} are missing")
    return state, origin


def _default_dtype(cfg: dict) -> torch.dtype:
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)


def convert_hf(src, out_dir, dtype: str | None = None, tokenizer=None) -> Path:
    """Convert an HF model directory. dtype: float32|float16|bfloat16 (default: the config's dtype, else float32).
    tokenizer: a directory with HF tokenizer files (default: SRC)."""
    from fasteagle.tokenizer import export_tokenizer_hf

    src = Path(src)
    if not src.exists():
        raise FastEagleError(f"{src}: no such file or directory")
    if not src.is_dir() or not (src / "config.json").is_file():
        raise FastEagleError(f"{src}: not a Hugging Face model directory (no config.json)")
    check_out_dir(out_dir)
    try:
        cfg = json.loads((src / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FastEagleError(f"{src / 'config.json'}: not valid JSON ({e})") from None
    args, notes = model_args_from_hf(cfg, str(src))
    torch_dtype = parse_dtype(dtype, _default_dtype(cfg))
    state, origin = read_hf_state(src, args, torch_dtype)
    tok_src = Path(tokenizer) if tokenizer else src
    source = {"type": "hf", "path": str(src.resolve()), **notes}
    return write_target(out_dir, args, state, torch_dtype, lambda d: export_tokenizer_hf(tok_src, d), source, origin)

