"""Hugging Face model directory (Llama / Mistral / Qwen2 family) -> fasteagle checkpoint.

HF q/k projections already use the rotate-half rope layout model.py uses, so weights are only renamed
(and cast); the work here is reading every storage variant and validating the config."""
import json
import re
import struct
from pathlib import Path

import torch

from fasteagle.convert.common import check_args, check_out_dir, parse_dtype, progress, warn, write_target
from fasteagle.errors import FastEagleError
from fasteagle.model import ModelArgs

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

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
]
_RENAMES = [(re.compile(p + "$"), r) for p, r in _RENAMES]
# Buffers some older checkpoints saved that carry no information.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


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
    if family == "llama" and cfg.get("attention_bias"):
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
            arch=family,
        )
    except KeyError as e:
        raise FastEagleError(f"{where}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise FastEagleError(f"{where}: bad value in config.json: {e}") from None
    check_args(args, where)

    notes = {"architecture": arch}
    # Sliding-window attention is not implemented: the engine always attends to the whole context, which equals
    # the HF model only while the context is shorter than the window.
    window = cfg.get("sliding_window")
    uses_window = family == "mistral" or (family == "qwen2" and cfg.get("use_sliding_window"))
    if uses_window and window:
        notes["sliding_window"] = window
        notes["attention"] = "full attention (sliding window not implemented)"
        if window < args.max_position_embeddings:
            warn(
                f"{where}: the model was trained with sliding_window={window} < max_position_embeddings="
                f"{args.max_position_embeddings}; fasteagle uses full attention, so outputs differ from the original "
                f"beyond {window} tokens"
            )
    return args, notes


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
    for path in weight_files(src):
        reader = _iter_safetensors(path) if path.suffix == ".safetensors" else _iter_torch_bin(path)
        for name, t in progress(reader, desc=f"reading {path.name}"):
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

