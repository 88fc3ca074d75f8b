"""GGUF -> fasteagle checkpoint. The GGUFs are written here from tiny random HF Llama models the way llama.cpp's
convert_hf_to_gguf does (Q/K rows permuted to llama.cpp's rope layout, llama.* metadata, rope_freqs for Llama-3.1
rope scaling, a BPE tokenizer in the metadata), in several tensor types; the converted model must reproduce the HF
model's logits."""
import numpy as np
import pytest
import torch

from conftest import CHAT_TEMPLATE, fe_greedy, fe_logits, tiny_bpe
from fasteagle.checkpoint import load_target
from fasteagle.convert.__main__ import main
from fasteagle.convert.common import half_to_interleaved
from fasteagle.convert.gguf import convert_gguf
from fasteagle.errors import FastEagleError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def bpe():
    return tiny_bpe()


def make_llama(vocab: int, tied: bool, seed=0):
    """Tiny random GQA Llama-3.1-style model with random norm weights. llama3 rope scaling with a short original
    context so that all three frequency bands occur (3 of the 16 frequencies between the cut-offs); head_dim 32
    != hidden/heads, which llama.cpp records as attention.key_length."""
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=vocab, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.2,
        tie_word_embeddings=tied, rope_parameters={"rope_theta": 10000.0, **LLAMA3_ROPE})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.generation_config.eos_token_id = None
    return model


def llama3_rope_factors(head_dim: int, theta: float, s: dict) -> np.ndarray:
    """What convert_hf_to_gguf stores as rope_freqs.weight for Llama-3.1 rope scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def gguf_name(hf_name: str) -> str:
    table = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")  # model.layers.{i}.{module...}.weight
    return f"blk.{parts[2]}.{table['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_gguf(model, path, qtype, bpe, rope_freqs=True, arch="llama", permute=True, head_qtype=None):
    """Write `model` into a GGUF like llama.cpp's converter: 1-D tensors F32, matrices in qtype (output.weight in
    head_qtype when given). permute=False skips llama.cpp's Q/K row permutation (only to show that the tests would
    notice)."""
    tok, tokens, merges = bpe
    c = model.config
    n_heads, n_kv = c.num_attention_heads, c.num_key_value_heads
    head_dim = c.head_dim or c.hidden_size // n_heads
    permute = permute and arch == "llama"  # qwen2/qwen3 GGUFs keep the rotate-half ("neox") layout
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    if head_dim != c.hidden_size // n_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if getattr(c, "num_local_experts", None):
        w.add_expert_count(c.num_local_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(c.head_dim, c.rope_parameters["rope_theta"], LLAMA3_ROPE))
    state = dict(model.state_dict())
    for i in range(c.num_hidden_layers):  # Mixtral (transformers 5 holds the experts stacked, gate and up fused):
        gate_up = state.pop(f"model.layers.{i}.mlp.experts.gate_up_proj", None)  # as llama.cpp's ffn_*_exps [E, ...]
        if gate_up is not None:
            gate, up = gate_up.float().chunk(2, dim=1)
            w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", state.pop(f"model.layers.{i}.mlp.gate.weight").float().numpy())
            w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", gate.contiguous().numpy())
            w.add_tensor(f"blk.{i}.ffn_up_exps.weight", up.contiguous().numpy())
            w.add_tensor(f"blk.{i}.ffn_down_exps.weight",
                         state.pop(f"model.layers.{i}.mlp.experts.down_proj").float().numpy())
    for name, t in state.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.float()
        if "q_proj" in name and permute:
            t = half_to_interleaved(t, n_heads)
        elif "k_proj" in name and permute:
            t = half_to_interleaved(t, n_kv)
        a = t.numpy()
        qt = head_qtype if head_qtype is not None and name == "lm_head.weight" else qtype
        if a.ndim == 1 or qt == Q.F32:
            w.add_tensor(gguf_name(name), a.astype(np.float32))
        elif qt == Q.F16:
            w.add_tensor(gguf_name(name), a.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rounded_copy(model, qtype):
    """The HF model with every matrix rounded through qtype, i.e. exactly the values the GGUF holds (quant blocks
    run along rows, so the row permutation of Q/K commutes with the rounding)."""
    ref = make_llama(model.config.vocab_size, model.config.tie_word_embeddings)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2 and qtype != Q.F32:
                a = p.numpy()
                r = a.astype(np.float16).astype(np.float32) if qtype == Q.F16 else \
                    gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
                p.copy_(torch.from_numpy(np.ascontiguousarray(r)).reshape(p.shape))
    return ref


@pytest.mark.parametrize("head_dim,theta,scaling", [
    (128, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}),  # Llama-3.1 8B/70B/405B
    (64, 500000.0, {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}),  # Llama-3.2 1B
    (16, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}),  # too few in-between frequencies: preset
])
def test_llama3_rope_from_rope_freqs(head_dim, theta, scaling):
    from fasteagle.convert.gguf import _llama3_scaling
    from fasteagle.model import ModelArgs

    scaling = {"rope_type": "llama3", **scaling}
    base = ModelArgs(dim=head_dim * 2, n_heads=2, n_kv_heads=2, head_dim=head_dim, rope_theta=theta)
    assert _llama3_scaling(llama3_rope_factors(head_dim, theta, scaling), base, None, "x") == scaling
    with pytest.raises(FastEagleError, match="not a Llama-3.1 rope scaling curve"):
        _llama3_scaling(np.linspace(1, 3, head_dim // 2).astype(np.float32), base, None, "x")


# qtype -> max |logit diff| allowed vs the original float model: only quantization error (these logits have a
# spread of about +-5). The tight check is against the model rounded through qtype: 1e-4 for every type.
LOOSE = {Q.F32: 1e-4, Q.F16: 0.05, Q.BF16: 0.5, Q.Q8_0: 1.0}


@pytest.mark.parametrize("qtype", list(LOOSE), ids=lambda q: q.name)
def test_gguf_parity(qtype, bpe, tmp_path):
    vocab = len(bpe[1])
    hf = make_llama(vocab, tied=False)
    path = tmp_path / f"tiny.{qtype.name}.gguf"
    write_gguf(hf, path, qtype, bpe)
    assert main(["gguf", str(path), str(tmp_path / "out")]) == 0
    model, cfg = load_target(tmp_path / "out", max_seq_len=128)
    assert model.args.rope_scaling == LLAMA3_ROPE and model.args.rope_theta == 10000.0
    a = model.args
    assert a.head_dim == 32 and a.n_kv_heads == 2 and not a.tie_embeddings and a.vocab_size == vocab
    n_matrices = 2 * 7 + 2  # per layer q, k, v, o, gate, up, down; embedding; output
    n_norms = 2 * 2 + 1
    assert cfg["source"]["tensor_types"][qtype.name] == n_matrices + (n_norms if qtype == Q.F32 else 0)

    ids = torch.randint(3, vocab, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    got = fe_logits(model, ids)
    with torch.no_grad():
        exact = rounded_copy(hf, qtype)(torch.tensor([ids])).logits[0]
        orig = hf(torch.tensor([ids])).logits[0]
    assert (got - exact).abs().max() < 1e-4
    assert (got - orig).abs().max() < LOOSE[qtype]


def test_gguf_tied_greedy_and_tokenizer(bpe, tmp_path):
    """No output.weight -> tied head; 32 greedy tokens equal transformers' generate; the GGUF's tokenizer
    encodes like the HF tokenizer it was made from."""
    tok = bpe[0]
    hf = make_llama(len(bpe[1]), tied=True, seed=3)
    path = tmp_path / "tied.gguf"
    write_gguf(hf, path, Q.F32, bpe)
    convert_gguf(path, tmp_path / "out")
    model, cfg = load_target(tmp_path / "out", max_seq_len=128)
    assert model.args.tie_embeddings and model.output is None
    prompt = tok.encode("Once upon a time").ids
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert fe_greedy(model, prompt, 32) == ref and len(set(ref)) > 4

    from fasteagle.tokenizer import load_tokenizer

    t = load_tokenizer(tmp_path / "out")
    text = "What is the capital of France? Paris."
    assert t.encode(text, bos=False) == tok.encode(text).ids
    assert cfg["eos_token_ids"] == [2] and cfg["bos_token_id"] == 1
    assert cfg["chat_template_jinja"] == CHAT_TEMPLATE
    chat = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    assert t.encode_chat([{"role": "user", "content": text}]) == tok.encode(chat).ids


def test_gguf_without_unpermute_is_wrong(bpe, tmp_path):
    """Guard that the parity tests are sensitive to the Q/K layout: writing Q/K without llama.cpp's permutation
    (so that our un-permutation scrambles them) must change the logits."""
    vocab = len(bpe[1])
    hf = make_llama(vocab, tied=False)
    path = tmp_path / "unpermuted.gguf"
    write_gguf(hf, path, Q.F32, bpe, permute=False)
    convert_gguf(path, tmp_path / "out")
    model, _ = load_target(tmp_path / "out", max_seq_len=64)
    ids = list(range(3, 33))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (fe_logits(model, ids) - ref).abs().max() > 1e-2


def test_gguf_truncated(bpe, tmp_path, capsys):
    hf = make_llama(len(bpe[1]), tied=False)
    path = tmp_path / "trunc.gguf"
    write_gguf(hf, path, Q.F16, bpe)
    path.write_bytes(path.read_bytes()[:-3000])
    assert main(["gguf", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(FastEagleError, match="truncated"):
        convert_gguf(path, tmp_path / "out")


@pytest.mark.parametrize("arch", ["qwen3", "mixtral"])
def test_gguf_qwen3_and_mixtral(arch, bpe, tmp_path):
    """A qwen3 GGUF (q/k norms, no Q/K permutation) and a llama-architecture Mixtral GGUF (router + stacked experts,
    4 experts top-2): logits equal transformers', and 24 greedy tokens equal its generate."""
    vocab = len(bpe[1])
    base = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=vocab, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False,
                max_position_embeddings=512)
    if arch == "qwen3":
        config, gguf_arch = transformers.Qwen3Config(**base, head_dim=32), "qwen3"
    else:
        config, gguf_arch = transformers.MixtralConfig(**base, num_local_experts=4, num_experts_per_tok=2), "llama"
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.generation_config.eos_token_id = None
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(hf, path, Q.F32, bpe, rope_freqs=False, arch=gguf_arch)
    model, cfg = load_target(convert_gguf(path, tmp_path / "out"), max_seq_len=128)
    assert model.args.arch == arch and model.args.qk_norm == (arch == "qwen3")
    assert model.args.n_experts == (4 if arch == "mixtral" else 0)
    ids = torch.randint(3, vocab, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (fe_logits(model, ids) - ref).abs().max() < 1e-4
    prompt = ids[:6]
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                      pad_token_id=0)[0, 6:].tolist()
    assert fe_greedy(model, prompt, 24) == out


@pytest.mark.parametrize("qtype, tied", [(Q.Q4_0, False), (Q.Q4_1, True), (Q.Q8_0, True), (Q.Q8_0, False)],
                         ids=["Q4_0", "Q4_1-tied", "Q8_0-tied", "Q8_0"])
def test_gguf_keep_quantized(qtype, tied, bpe, tmp_path):
    """--keep-quantized: every projection's and the LM head's stored codes and scales dequantize to exactly the weights
    the dequantizing conversion gives (llama.cpp's Q/K permutation undone on the codes), the tied embedding is that
    same table, and the checkpoint runs."""
    from fasteagle.quant import QuantLinear

    vocab = len(bpe[1])
    hf = make_llama(vocab, tied=tied)
    path = tmp_path / "tiny.gguf"
    write_gguf(hf, path, qtype, bpe)
    dense, _ = load_target(convert_gguf(path, tmp_path / "dense"), max_seq_len=128)
    assert main(["gguf", str(path), str(tmp_path / "kept"), "--keep-quantized"]) == 0
    kept, cfg = load_target(tmp_path / "kept", max_seq_len=128)
    mode = "int8" if qtype == Q.Q8_0 else "int4"
    assert cfg["quantization"] == {"mode": mode, "group_size": 32, "lm_head": {"mode": mode, "group_size": 32}}
    quantized = {name: m for name, m in kept.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 2 * 7 + 1
    for name, m in quantized.items():
        ref = dense.lm_head_weight() if name == "output" else dense.get_submodule(name).weight
        assert torch.equal(m.weight, ref), name
    assert torch.equal(kept.embed.weight, dense.embed.weight)
    ids = torch.randint(3, vocab, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    got, ref = fe_logits(kept, ids), fe_logits(dense, ids)  # the CPU kernel runs int8 per channel: close, not equal
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8 and (got - ref).abs().max() < 1.0


def test_gguf_keep_quantized_lm_head_of_another_type(bpe, tmp_path):
    """Q4_0 layers with an F16 LM head (llama.cpp stores Q6_K there): the head is requantized to int8 per channel."""
    hf = make_llama(len(bpe[1]), tied=False)
    path = tmp_path / "mixed.gguf"
    write_gguf(hf, path, Q.Q4_0, bpe, head_qtype=Q.F16)
    kept, cfg = load_target(convert_gguf(path, tmp_path / "kept", keep_quantized=True), max_seq_len=64)
    assert cfg["quantization"]["lm_head"] == {"mode": "int8", "group_size": None}
    want = hf.lm_head.weight.detach().half().float()
    assert (kept.output.weight - want).abs().max() <= want.abs().amax(1).max() / 254 + 1e-6  # half a step


def test_gguf_keep_quantized_refuses_other_types(bpe, tmp_path):
    hf = make_llama(len(bpe[1]), tied=False)
    path = tmp_path / "f16.gguf"
    write_gguf(hf, path, Q.F16, bpe)
    with pytest.raises(FastEagleError, match="--keep-quantized needs every layer projection in one of Q4_0, Q4_1, "
                                             "Q8_0; found F16"):
        convert_gguf(path, tmp_path / "out", keep_quantized=True)
    assert not (tmp_path / "out").exists()


def test_gguf_not_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(FastEagleError, match="not a GGUF file"):
        convert_gguf(path, tmp_path / "out")


def test_gguf_unsupported_architecture(bpe, tmp_path):
    hf = make_llama(len(bpe[1]), tied=False)
    path = tmp_path / "falcon.gguf"
    write_gguf(hf, path, Q.F32, bpe, arch="falcon")
    with pytest.raises(FastEagleError, match="unsupported GGUF architecture 'falcon'"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
