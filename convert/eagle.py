"""Published EAGLE-1/2 and EAGLE-3 draft heads (SafeAILab/EAGLE layout) -> fasteagle draft checkpoint.

A head directory holds a LLaMA-style config.json (num_hidden_layers 1, optional "bias" for the fc layer, default
true) and pytorch_model.bin or model.safetensors with
    fc.weight [dim, 2*dim], fc.bias [dim]
    layers.0.self_attn.{q,k,v,o}_proj.weight, layers.0.mlp.{gate,up,down}_proj.weight,
    layers.0.post_attention_layernorm.weight
    embed_tokens.weight (a copy of the target's; only its shape is checked: the engine uses the target's)
    layers.0.input_layernorm.weight (some exports carry it; the reference never applies it to the first layer)
An EAGLE-3 head (recognised by its midlayer.* tensors; fasteagle.eagle3) holds
    fc.weight [dim, 3*dim] (no bias), norm.weight, lm_head.weight [V_d, dim]
    midlayer.self_attn.{q,k,v}_proj.weight [.., 2*dim], midlayer.self_attn.o_proj.weight, midlayer.mlp.*,
    midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight
    d2t [V_d] (target id = draft id + d2t[draft id]), t2d [V] bool (which target ids the draft vocabulary holds)
and a config.json with draft_vocab_size; as in the reference, head_dim = hidden_size / num_attention_heads and rope
is base rope_theta (default 10000) without scaling. Its feature layers are the config's
eagle_aux_hidden_state_layer_ids when given, else the reference's 2, n_layers // 2, n_layers - 3 of the target.
"""
import json
from pathlib import Path

import torch

from fasteagle.checkpoint import read_config
from fasteagle.convert.common import parse_dtype, progress
from fasteagle.convert.hf import _iter_safetensors, _iter_torch_bin, hf_name_to_ours, model_args_from_hf, weight_files
from fasteagle.draft import DraftHead, save_draft
from fasteagle.eagle3 import Eagle3Head, default_taps
from fasteagle.errors import FastEagleError
from fasteagle.model import ModelArgs

IGNORED = {"embed_tokens.weight", "layers.0.input_layernorm.weight"}


def read_head(src: Path):
    """(config dict, {name: tensor}) of the head directory src."""
    where = str(src)
    cfg_path = src / "config.json"
    if not src.is_dir() or not cfg_path.is_file():
        raise FastEagleError(f"{src}: not an EAGLE head directory (expected config.json and weights)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FastEagleError(f"{cfg_path}: not valid JSON ({e})") from None
    tensors = {}
    for path in weight_files(src):
        reader = _iter_safetensors(path) if path.suffix == ".safetensors" else _iter_torch_bin(path)
        tensors.update(progress(reader, desc=f"reading {path.name}"))
    return cfg, tensors


def convert_eagle(src, out_dir, target, dtype: str | None = None) -> Path:
    """Convert the head at `src` (EAGLE-1/2 or EAGLE-3) for the converted target checkpoint at `target`, checking
    they fit."""
    src, out_dir = Path(src), Path(out_dir)
    cfg, tensors = read_head(src)
    tcfg = read_config(target, "target")["model"]
    eagle3 = any(k.startswith("midlayer.") for k in tensors) or "d2t" in tensors
    head = (_eagle3_head if eagle3 else _eagle_head)(src, cfg, tensors, tcfg)
    own = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)  # the head's dtype
    head = head.to(parse_dtype(dtype, own))
    save_draft(head, out_dir, {"source": {"converter": "eagle", "path": str(src.resolve()),
                                          "target": str(Path(target).resolve())}})
    return out_dir


def _check_fit(src, args: ModelArgs, tcfg: dict, tensors: dict):
    t_dim, t_vocab = tcfg["dim"], tcfg["vocab_size"]
    if args.dim != t_dim:
        raise FastEagleError(f"{src}: head hidden size {args.dim} does not match the target's {t_dim}")
    if args.vocab_size != t_vocab:
        raise FastEagleError(f"{src}: head vocabulary {args.vocab_size} does not match the target's {t_vocab}")
    emb = tensors.get("embed_tokens.weight")  # a copy of the target's: only its shape is checked
    if emb is not None and tuple(emb.shape) != (t_vocab, t_dim):
        raise FastEagleError(f"{src}: embed_tokens.weight is {tuple(emb.shape)}, the target's is {(t_vocab, t_dim)}")


def _load_checked(src, head, state: dict):
    """Load state into head after checking names and shapes, with one-line errors naming the head's file."""
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise FastEagleError(f"{src}: head weights missing: {', '.join(missing[:6])}")
    for name, t in state.items():
        if name not in expected:
            raise FastEagleError(f"{src}: unexpected tensor {name!r} in the head")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise FastEagleError(f"{src}: {name} has shape {tuple(t.shape)}, the config implies "
                                 f"{tuple(expected[name].shape)}")
    head.load_state_dict(state)
    return head


def _eagle_head(src, cfg, tensors, tcfg) -> DraftHead:
    if not cfg.get("architectures") and "model_type" not in cfg:
        cfg = {**cfg, "model_type": "llama"}
    args, _ = model_args_from_hf(cfg, str(src))
    if args.n_layers != 1:
        raise FastEagleError(f"{src}: an EAGLE-1/2 head has one decoder layer, config says {args.n_layers}")
    _check_fit(src, args, tcfg, tensors)
    fc_bias = bool(cfg.get("bias", True))
    state = {}
    for name, t in tensors.items():
        if name in IGNORED:
            continue
        ours = name if name.startswith("fc.") else hf_name_to_ours("model." + name)
        if ours is None:
            raise FastEagleError(f"{src}: unexpected tensor {name!r} in an EAGLE-1/2 head")
        state[ours] = t
    if "fc.bias" in state and not fc_bias:
        raise FastEagleError(f"{src}: config.json says bias=false but the weights have fc.bias")
    # the head's own target-side geometry: vocabulary and tied-ness come from the target; its layer is a dense
    # LLaMA layer whatever the target's family (a Mixtral head's config names the experts its layer does not have)
    args = ModelArgs(**{**args.draft_layer().to_dict(), "tie_embeddings": False})
    return _load_checked(src, DraftHead(args, fc_bias=fc_bias), state)


# published EAGLE-3 names -> fasteagle.eagle3.Eagle3Head's
EAGLE3_NAMES = {
    "midlayer.self_attn.q_proj.weight": "layers.0.attn.wq.weight",
    "midlayer.self_attn.k_proj.weight": "layers.0.attn.wk.weight",
    "midlayer.self_attn.v_proj.weight": "layers.0.attn.wv.weight",
    "midlayer.self_attn.o_proj.weight": "layers.0.attn.wo.weight",
    "midlayer.mlp.gate_proj.weight": "layers.0.mlp.w1.weight",
    "midlayer.mlp.up_proj.weight": "layers.0.mlp.w3.weight",
    "midlayer.mlp.down_proj.weight": "layers.0.mlp.w2.weight",
    "midlayer.input_layernorm.weight": "layers.0.input_norm.weight",
    "midlayer.hidden_norm.weight": "layers.0.hidden_norm.weight",
    "midlayer.post_attention_layernorm.weight": "layers.0.mlp_norm.weight",
    "fc.weight": "fc.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def eagle3_args(src, cfg: dict) -> ModelArgs:
    """The head layer's geometry, read as the reference reads it (head_dim = hidden / heads, rope base rope_theta or
    10000, no rope scaling)."""
    for key, bad in (("norm_before_residual", True), ("rope_scaling", None)):
        if cfg.get(key) and cfg.get(key) != bad:
            raise FastEagleError(f"{src}: EAGLE-3 config {key}={cfg[key]!r} is not supported")
    if cfg.get("target_hidden_size", cfg.get("hidden_size")) != cfg.get("hidden_size"):
        raise FastEagleError(f"{src}: target_hidden_size differs from hidden_size; not supported")
    try:
        dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelArgs(vocab_size=int(cfg["vocab_size"]), dim=dim, n_layers=1, n_heads=n_heads,
                         n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads), head_dim=dim // n_heads,
                         intermediate_size=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                         rope_theta=float(cfg.get("rope_theta", 10000.0)),
                         max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)))
    except KeyError as e:
        raise FastEagleError(f"{src}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise FastEagleError(f"{src}: bad value in config.json: {e}") from None


def _eagle3_head(src, cfg, tensors, tcfg) -> Eagle3Head:
    args = eagle3_args(src, cfg)
    _check_fit(src, args, tcfg, tensors)
    for name in ("d2t", "t2d", "lm_head.weight"):
        if name not in tensors:
            raise FastEagleError(f"{src}: EAGLE-3 head without {name}")
    d2t, t2d = tensors["d2t"].long(), tensors["t2d"].bool()
    n_draft = int(cfg.get("draft_vocab_size", d2t.shape[0]))
    if d2t.shape != (n_draft,) or t2d.shape != (args.vocab_size,) or int(t2d.sum()) != n_draft:
        raise FastEagleError(f"{src}: d2t {tuple(d2t.shape)} / t2d {tuple(t2d.shape)} (holding {int(t2d.sum())}) "
                             f"do not describe a {n_draft}-token draft vocabulary of {args.vocab_size} target ids")
    ids = torch.arange(n_draft) + d2t
    if int(ids.min()) < 0 or int(ids.max()) >= args.vocab_size or not bool(t2d[ids].all()):
        raise FastEagleError(f"{src}: d2t maps draft ids to target ids that t2d does not hold")
    extra = cfg.get("eagle_config") or {}
    taps = extra.get("eagle_aux_hidden_state_layer_ids") or cfg.get("eagle_aux_hidden_state_layer_ids")
    taps = tuple(taps) if taps else default_taps(tcfg["n_layers"])
    if not all(0 <= int(i) < tcfg["n_layers"] for i in taps):
        raise FastEagleError(f"{src}: feature layers {list(taps)} do not exist in the {tcfg['n_layers']}-layer target")
    state = {"draft_vocab": ids}
    for name, t in tensors.items():
        if name in ("d2t", "t2d", "embed_tokens.weight"):
            continue
        if name not in EAGLE3_NAMES:
            raise FastEagleError(f"{src}: unexpected tensor {name!r} in an EAGLE-3 head")
        state[EAGLE3_NAMES[name]] = t
    return _load_checked(src, Eagle3Head(args, n_draft, taps), state)


def add_eagle(sub):
    p = sub.add_parser("eagle", help="EAGLE-1/2 or EAGLE-3 draft head (SafeAILab/EAGLE layout) for a converted target",
                       description="EAGLE-1/2 or EAGLE-3 draft head (SafeAILab/EAGLE layout) for a converted target")
    p.add_argument("src", metavar="SRC", help="head directory: config.json + pytorch_model.bin or model.safetensors")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output draft checkpoint directory")
    p.add_argument("--target", required=True, metavar="DIR", help="the converted target checkpoint it drafts for")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the head's own")
    p.set_defaults(run=lambda a: convert_eagle(a.src, a.out_dir, a.target, a.dtype))
