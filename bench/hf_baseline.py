"""The optional baseline: Hugging Face `transformers` `generate` on the same weights, so users can compare fasteagle
with what they run today. The HF model is built from the loaded fasteagle target (our rotary layout is HF's, so the
weights go across unchanged; names map through the HF converter's table), in the same dtype and on the same device.
"""
import time

import torch

from fasteagle.errors import FastEagleError


def build_hf_model(target):
    """A transformers causal LM holding `target`'s weights (shared storage is not assumed: weights are copied)."""
    try:
        import transformers
    except ImportError:
        raise FastEagleError("method 'hf' needs the transformers package (pip install transformers)") from None
    from fasteagle.convert.hf import hf_name_to_ours

    a = target.args
    if a.n_experts:
        raise FastEagleError("method 'hf' does not support mixture-of-experts targets")
    cls_name, cfg_name = {"llama": ("LlamaForCausalLM", "LlamaConfig"),
                          "mistral": ("MistralForCausalLM", "MistralConfig"),
                          "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
                          "qwen3": ("Qwen3ForCausalLM", "Qwen3Config")}[a.arch]
    if a.qkv_bias and a.arch != "qwen2":
        raise FastEagleError("method 'hf': q/k/v biases are only supported for Qwen2 models")
    if a.sliding_window and a.arch not in ("mistral", "qwen2", "qwen3"):
        raise FastEagleError(f"method 'hf': a sliding window on a {a.arch} model")
    extra = {}
    if a.arch in ("mistral", "qwen2", "qwen3"):  # the window on every layer, or none
        extra = {"sliding_window": a.sliding_window}
        if a.arch != "mistral":
            extra.update(use_sliding_window=bool(a.sliding_window), max_window_layers=0)
    config = getattr(transformers, cfg_name)(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
        head_dim=a.head_dim, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, rope_scaling=a.rope_scaling,
        max_position_embeddings=a.max_position_embeddings, tie_word_embeddings=a.tie_embeddings,
        hidden_act="silu", **extra)
    param = target.embed.weight
    with torch.device(param.device):
        model = getattr(transformers, cls_name)(config).to(param.dtype)
    ours = target.state_dict()
    state = {}
    for name in model.state_dict():
        src = hf_name_to_ours(name)
        if src is None or (a.tie_embeddings and src == "output.weight"):
            continue  # rotary buffers; the tied LM head (the embedding itself)
        if src not in ours:
            raise FastEagleError(f"method 'hf': no fasteagle weight for {name} ({src})")
        state[name] = ours[src]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (a.tie_embeddings and m == "lm_head.weight") and "rotary" not in m]
    if missing or unexpected:
        raise FastEagleError(f"method 'hf': weights do not map: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if a.tie_embeddings:
        model.tie_weights()
    return model.eval()


@torch.no_grad()
def hf_generate(model, prompt_ids, max_new_tokens: int, eos_ids, params, seed: int | None):
    """HF generate on one prompt. Returns (new tokens, cut after the first EOS as fasteagle cuts; seconds)."""
    dev = model.device
    ids = torch.tensor([prompt_ids], device=dev)
    kw = dict(do_sample=False) if params.greedy else dict(
        do_sample=True, temperature=params.temperature, top_k=params.top_k or None, top_p=params.top_p)
    if not params.greedy and seed is not None:
        torch.manual_seed(seed)
    eos = list(eos_ids) or None
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, min_new_tokens=0,
                         eos_token_id=eos, pad_token_id=eos[0] if eos else 0, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    new = out[0, len(prompt_ids):].tolist()
    for i, t in enumerate(new):
        if t in (eos or ()):
            new = new[: i + 1]
            break
    return new, seconds
