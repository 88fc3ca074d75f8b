"""Quantized targets (fasteagle/quant.py, python -m fasteagle.quantize): the stored int8 / int4 formats, the CPU kernel
against the dequantized weights within its stated error bound, its row independence (bit for bit: what makes
speculative decoding lossless on a quantized target), the quantize CLI's round trip and its one-line errors, and
EAGLE decoding over int8 / int4 tiny targets equal to their own AR decoding."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import write_tiny_model
from fasteagle import linear, quant
from fasteagle.checkpoint import load_target
from fasteagle.draft import load_draft
from fasteagle.engine import SpecEngine
from fasteagle.model import causal_mask
from fasteagle.quantize import main as quantize_main
from fasteagle.sampling import SamplingParams
from fasteagle.tokenizer import load_tokenizer
from test_spec_greedy import prompts
from tiny import predictable_pair, random_target

SETTINGS = [("int8", None), ("int4", 32)]
CPU_PATHS = ["skinny8", "int8pack"]  # the few-row GEMM kernel's int8 variant; torch's kernel where it cannot build


def use_cpu_path(path, monkeypatch):
    monkeypatch.setattr(linear, "USE_SKINNY", path == "skinny8")
    if path == "skinny8" and not linear.skinny_available():
        pytest.skip("the skinny GEMM kernel does not build here")


def quantized(model, mode, group_size):
    return quant.prepare_model(quant.quantize_model(model, mode, group_size))


def logits(model, ids):
    T = len(ids)
    with torch.no_grad():
        return model.logits(model(torch.tensor([ids]), torch.arange(T)[None], torch.zeros(1, dtype=torch.long),
                                  causal_mask(T)))[0]


# --- formats and kernels -------------------------------------------------------------------------------------


def test_stored_formats():
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    q, scale = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and scale.shape == (48,)
    assert ((q * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()  # round to nearest
    packed, sz = quant.quantize_int4(w, 32)
    assert packed.shape == (48, 64) and packed.dtype == torch.uint8 and sz.shape == (4, 48, 2)
    codes = quant.unpack_int4(packed)
    assert torch.equal(packed, (codes[:, 0::2] << 4) | codes[:, 1::2])  # high nibble: the even input
    scales = sz[..., 0].T.repeat_interleave(32, 1)  # [48, 128]
    ref = (codes.float() - 8) * scales + sz[..., 1].T.repeat_interleave(32, 1)
    assert torch.equal(quant.dequantize_int4(packed, sz), ref)
    assert ((ref - w).abs() <= scales / 2 + 1e-5).all()


def act_bound(x, w, path):
    """The CPU kernels' error against x @ w.T.
    skinny8: fp32 sums of K products of fp32 activations and exact int8 weights, times an fp32 scale:
      ~K * 2^-24 * (|x| @ |w|.T), checked as 1e-6 * K * that.
    int8pack: the activations, the per-channel scales and the result are each rounded to bf16 (relative error
      <= 2^-9 each), the sums are fp32: |error[m, n]| <= 3 * 2^-9 * (|x| @ |w|.T)[m, n], plus fp32 rounding."""
    if path == "skinny8":
        return (x.abs() @ w.abs().T) * (1e-6 * x.shape[-1]) + 1e-6
    return (x.abs() @ w.abs().T) * (3 * 2 ** -9 * 1.01) + 1e-5


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("mode,group_size", SETTINGS)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_against_the_dequantized_weights(mode, group_size, bias, path, monkeypatch):
    use_cpu_path(path, monkeypatch)
    torch.manual_seed(1)
    w, b = torch.randn(40, 96), torch.randn(40) if bias else None
    lin = quant.QuantLinear.quantize(w, b, mode, group_size).prepare()
    assert lin.path == path
    x = torch.randn(2, 5, 96) * 3 + 1
    ref = F.linear(x, lin.weight, b)
    bound = act_bound(x.reshape(-1, 96), lin.weight, path).reshape(ref.shape)
    if mode == "int4":  # on a CPU int4 runs through int8: its weights requantized per channel (half a step each)
        w8_step = lin.weight.abs().amax(1) / 127
        bound = bound + (x.abs().sum(-1, keepdim=True) * w8_step / 2) * 1.01
    assert ((lin(x) - ref).abs() <= bound).all()
    if path == "skinny8" and mode == "int8":  # negative control: the bound is tight enough to see int8pack's bf16 activations
        x_bf16 = x.to(torch.bfloat16).float()
        assert not ((F.linear(x_bf16, lin.weight, b) - ref).abs() <= bound).all()
    lin.path = "dequantize"  # what other devices run
    torch.testing.assert_close(lin(x), ref)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_rows_are_independent_bit_for_bit(threads, path, monkeypatch):
    use_cpu_path(path, monkeypatch)
    torch.manual_seed(2)
    lin = quant.QuantLinear.quantize(torch.randn(33, 48), torch.randn(33), "int8").prepare()
    assert lin.path == path
    x = torch.randn(70, 48) * torch.logspace(-4, 4, 70)[:, None] + torch.randn(70, 1) * 10  # wildly different rows
    x[5], x[9], x[11, 3] = 0.0, 3.0, 1e4  # zero, constant, one outlier
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            alone = torch.cat([lin(x[i:i + 1]) for i in range(70)])
            for M in (2, 5, 11, 60):
                for start in range(0, 70 - M + 1, 3):
                    assert torch.equal(lin(x[start:start + M]), alone[start:start + M]), (M, start)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_compiled_cpu_forward_runs_the_same_kernel(path, monkeypatch):
    use_cpu_path(path, monkeypatch)
    torch.manual_seed(3)
    lin = quant.QuantLinear.quantize(torch.randn(24, 64), None, "int8").prepare()
    x = torch.randn(3, 64)
    assert torch.equal(torch.compile(lin, fullgraph=True)(x), lin(x))


@pytest.mark.parametrize("path", CPU_PATHS)
def test_widths_off_the_int8pack_block(path, monkeypatch):
    """40 input features: the skinny kernel takes them; torch's CPU int8 kernel does not (blocks of 16), so there a
    projection multiplies by its dequantized weight."""
    use_cpu_path(path, monkeypatch)
    torch.manual_seed(6)
    lin = quant.QuantLinear.quantize(torch.randn(24, 40), None, "int8").prepare()
    assert lin.path == ("skinny8" if path == "skinny8" else "dequantize")
    x = torch.randn(3, 40)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight))


def test_bf16_cpu_target_takes_torchs_kernel(monkeypatch):
    """The skinny kernel takes fp32 activations: a bf16 model on a CPU runs int8pack (and its fp64 attention)."""
    use_cpu_path("skinny8", monkeypatch)
    model = quant.quantize_model(random_target(seed=7), "int8", None).to(torch.bfloat16)
    quant.prepare_model(model)
    assert model.output.path == "int8pack" and model.kv_dtype == torch.float64
    assert len(SpecEngine(model).generate([1, 2, 3], 5).tokens) == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mode,group_size,shape", [("int8", None, (96, 128)), ("int4", 64, (96, 128)),
                                                   ("int4", 32, (36, 96))])  # 36 rows: the fallback
def test_cuda_kernels_against_the_dequantized_weights(mode, group_size, shape):
    torch.manual_seed(4)
    lin = quant.QuantLinear.quantize(torch.randn(*shape), None, mode, group_size).cuda().prepare()
    x = torch.randn(7, shape[1], device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.float(), lin.weight.float())
    torch.testing.assert_close(lin(x).float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.02)


# --- whole models ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_model_is_close_to_fp32_and_stacks_its_groups(tied):
    fp = random_target(seed=5, tie_embeddings=tied, qkv_bias=True)
    q = quantized(random_target(seed=5, tie_embeddings=tied, qkv_bias=True), "int8", None)
    names = set(q.state_dict())
    assert "output.weight_int8" in names and ("embed.weight" in names) != tied  # a tied table is stored once
    attn = q.layers[0].attn
    assert attn.group_linear.out_features == sum(m.out_features for m in attn.group())
    assert attn.wq.weight_int8.data_ptr() == attn.group_linear.weight_int8.data_ptr()  # views: held once
    if tied:
        torch.testing.assert_close(q.embed.weight, q.output.weight)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    ref = logits(fp, ids)
    assert (logits(q, ids) - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("quant"))


@pytest.mark.parametrize("mode,group_size", SETTINGS)
def test_quantize_round_trip(tiny_ckpt, tmp_path, mode, group_size, capsys):
    ckpt, head = tiny_ckpt
    out = tmp_path / mode
    assert quantize_main([str(ckpt), str(out), "--mode", mode] + (["--group-size", "32"] if group_size else [])) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"mode": mode, "group_size": group_size}
    src = json.loads((ckpt / "config.json").read_text())
    assert cfg["chat_template_jinja"] == src["chat_template_jinja"]
    tok = load_tokenizer(out)
    assert tok.encode_chat([{"role": "user", "content": "hi"}]) == load_tokenizer(ckpt).encode_chat(
        [{"role": "user", "content": "hi"}])

    loaded, _ = load_target(out, max_seq_len=64)
    in_memory, _ = load_target(ckpt, max_seq_len=64, quantize=mode, group_size=group_size)
    fp, _ = load_target(ckpt, max_seq_len=64)
    ids = [1, 270, 271, 5, 42, 7]
    assert torch.equal(logits(loaded, ids), logits(in_memory, ids))
    ref = logits(fp, ids)
    assert (logits(loaded, ids) - ref).abs().max() < (0.05 if mode == "int8" else 0.25) * ref.abs().max()
    engine = SpecEngine(loaded, load_draft(head, loaded), depth=3, top_k=4, total_tokens=16)
    assert engine.generate(ids, 12).tokens == SpecEngine(loaded).generate(ids, 12).tokens


def run_quantize(capsys, *argv):
    rc = quantize_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, err


@pytest.mark.parametrize("flags,message", [
    (["--mode", "int3"], "unknown quantization mode 'int3'"),
    (["--mode", "int4", "--group-size", "64"], "int4 group size 64 does not divide the 32 input features of "
                                               "layers.0.attn.wq"),
    (["--mode", "int4", "--group-size", "48"], "int4 group size 48: must be one of 32, 64, 128"),
    (["--mode", "int8", "--group-size", "32"], "a group size applies to int4 only"),
])
def test_bad_settings_are_one_line_errors(tiny_ckpt, tmp_path, capsys, flags, message):
    rc, err = run_quantize(capsys, tiny_ckpt[0], tmp_path / "out", *flags)
    assert rc == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary directory left


def test_bad_inputs_are_one_line_errors(tiny_ckpt, tmp_path, capsys):
    ckpt = tiny_ckpt[0]
    assert run_quantize(capsys, ckpt, tmp_path / "q", "--mode", "int8")[0] == 0
    rc, err = run_quantize(capsys, tmp_path / "q", tmp_path / "again", "--mode", "int4", "--group-size", "32")
    assert rc == 1 and "already quantized" in err and err.count("\n") == 1
    rc, err = run_quantize(capsys, ckpt, tmp_path / "q", "--mode", "int4", "--group-size", "32")
    assert rc == 1 and "output directory exists and is not empty" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    with pytest.raises(Exception, match="already quantized"):
        load_target(tmp_path / "q", quantize="int8")


# --- lossless with respect to the quantized model ---------------------------------------------------------------


@pytest.fixture(scope="module", params=[(m, g, p) for m, g in SETTINGS for p in CPU_PATHS],
                ids=[f"{m}-{p}" for m, _ in SETTINGS for p in CPU_PATHS])
def quantized_pairs(request):
    mode, group_size, path = request.param
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_cpu_path(path, monkeypatch)
        pairs = []
        for alpha in (0.0, 1.0, 2.0):
            target, head = predictable_pair(alpha, vocab=64)
            quantized(target, mode, group_size)
            assert target.output.path == path
            pairs.append((target, head.bind(target)))  # the head drafts with the quantized model's embedding / LM head
    return pairs


def tree_rows_and_steps(model, prefix, chain, others):
    """The 3 `chain` tokens after `prefix`, computed two ways: as rows of one tree forward in which they sit at
    scattered slots among three other branches (what a verify computes), and as one-token steps (what AR computes).
    Each way: (final hidden states [3, dim], every layer's attention output [3, n_layers * dim])."""
    P = len(prefix)
    tokens = [chain[0], others[0], chain[1], others[1], others[2], chain[2]]
    parent, depth = [-1, 0, 0, 2, 0, 2], [0, 1, 1, 2, 1, 2]
    mask = torch.eye(6, dtype=torch.bool)
    for i in range(6):
        j = parent[i]
        while j >= 0:
            mask[i, j], j = True, parent[j]
    attn = []
    hooks = [layer.attn.wo.register_forward_pre_hook(lambda mod, inp: attn.append(inp[0][0])) for layer in model.layers]

    def run(toks, pos, start, m):
        attn.clear()
        with torch.no_grad():
            return model(torch.tensor([toks]), torch.tensor([pos]), torch.tensor([start]), m)[0], torch.cat(attn, -1)

    try:
        run(prefix, list(range(P)), 0, causal_mask(P))
        tree = [t[[0, 2, 5]] for t in run(tokens, [P + d for d in depth], P, mask)]
        run(prefix, list(range(P)), 0, causal_mask(P))  # the same cache state again
        steps = [run([t], [P + i], P + i, causal_mask(1)) for i, t in enumerate(chain)]
    finally:
        for h in hooks:
            h.remove()
    return tree, [torch.cat(parts) for parts in zip(*steps)]


@pytest.mark.parametrize("mode,group_size", SETTINGS)
def test_int8pack_tree_rows_equal_one_token_steps_bit_for_bit(mode, group_size, monkeypatch):
    """Where torch's int8 kernel runs (no C++ compiler) the whole quantized forward is row-independent, attention
    included. That kernel rounds its input to bf16, so a last-bit difference from fp32 attention (a tree row reduces
    over its keys in another order than a one-token step) can move a rounding and grow: on SmolLM2 int8 the logits
    of the two drifted up to ~0.5 apart. In fp64, rounded to fp32, the attention outputs are equal. Negative
    control: fp32 attention outputs differ (these small models mostly absorb that by the last layer; SmolLM2 does
    not)."""
    use_cpu_path("int8pack", monkeypatch)
    for seed in range(3):
        model = quantized(random_target(seed, vocab=64, dim=64), mode, group_size)
        assert model.layers[0].attn.kv_cache.k.dtype == torch.float64  # prepare_model set the cache up again
        prefix = torch.randint(0, 64, (150,), generator=torch.Generator().manual_seed(seed)).tolist()
        (hidden, attn), (hidden1, attn1) = tree_rows_and_steps(model, prefix, [3, 5, 7], [11, 13, 17])
        assert torch.equal(attn, attn1) and torch.equal(hidden, hidden1), seed
        model.kv_dtype = None
        model.setup_cache(model.max_seq_len)
        (_, attn), (_, attn1) = tree_rows_and_steps(model, prefix, [3, 5, 7], [11, 13, 17])
        assert not torch.equal(attn, attn1), seed


def test_skinny8_keeps_fp32_attention_and_drifts_like_fp32(monkeypatch):
    """With the skinny kernel's int8 variant (fp32 activations, row-exact sums) a quantized target is an fp32 model
    whose weights happen to be int8 times a scale: fp32 KV cache and attention, and tree rows drift from one-token
    steps only by fp32 attention's last bits, as in the fp32 model (nothing rounds them up to bf16)."""
    use_cpu_path("skinny8", monkeypatch)
    for seed in range(3):
        fp = random_target(seed, vocab=64, dim=64)
        model = quantized(random_target(seed, vocab=64, dim=64), "int8", None)
        assert model.kv_dtype is None and model.layers[0].attn.kv_cache.k.dtype == torch.float32
        prefix = torch.randint(0, 64, (150,), generator=torch.Generator().manual_seed(seed)).tolist()
        drift = {}
        for name, m in (("fp32", fp), ("int8", model)):
            (hidden, _), (hidden1, _) = tree_rows_and_steps(m, prefix, [3, 5, 7], [11, 13, 17])
            drift[name] = ((hidden - hidden1).abs().max() / hidden.abs().max()).item()
        assert drift["int8"] < 1e-5 and drift["int8"] < 20 * drift["fp32"] + 1e-6, (seed, drift)


@pytest.mark.parametrize("depth,top_k,total", [(1, 1, 2), (3, 1, 64), (2, 2, 5), (4, 4, 20), (6, 8, 64)])
def test_eagle2_greedy_equals_the_quantized_models_own_ar(quantized_pairs, depth, top_k, total):
    accepted = 0
    for i, (target, head) in enumerate(quantized_pairs):
        ar = SpecEngine(target)
        spec = SpecEngine(target, head, depth=depth, top_k=top_k, total_tokens=total)
        for prompt in prompts(3, 64, seed=10 * i + depth):
            out = spec.generate(prompt, 40)
            assert out.tokens == ar.generate(prompt, 40).tokens, (i, prompt)
            accepted += sum(n - 1 for n in out.accept_lens)
    assert accepted > 0  # drafted tokens were accepted: the rows of a verify forward were really compared


def test_static_tree_and_sampling_run_on_the_quantized_model(quantized_pairs):
    target, head = quantized_pairs[1]
    spec = SpecEngine(target, head, tree="static")
    prompt = prompts(1, 64, seed=3)[0]
    assert spec.generate(prompt, 30).tokens == SpecEngine(target).generate(prompt, 30).tokens
    params = SamplingParams(0.8, top_k=20, top_p=0.9)
    dynamic = SpecEngine(target, head, depth=3, top_k=4, total_tokens=12)
    a, b = dynamic.generate(prompt, 30, params, seed=7), dynamic.generate(prompt, 30, params, seed=7)
    assert a.tokens == b.tokens and len(a.tokens) == 30 and all(0 <= t < 64 for t in a.tokens)


def test_quality_measures_tell_fp32_from_int4():
    """bench.quant_quality: fp32 against itself is a perfect match; int4 of a random target is not, and the measures
    say so in the right direction (KL > 0, some greedy token or top-1 changed)."""
    from bench.quant_quality import greedy_stats, text_stats

    fp = random_target(seed=4, max_seq_len=64)
    q = quantized(random_target(seed=4, max_seq_len=64), "int4", 32)
    ps = prompts(6, fp.args.vocab_size)
    g = greedy_stats({"fp32": fp, "int4": q}, ps, 16, (), False)
    t = text_stats({"fp32": fp, "int4": q}, ps, False)
    assert g["fp32"] == {"equal_share": 1.0, "mean_common_prefix": 16.0}
    assert t["fp32"]["kl_per_token"] == pytest.approx(0, abs=1e-6) and t["fp32"]["top1_agreement"] == 1.0
    assert t["int4"]["kl_per_token"] > 1e-4
    assert g["int4"]["equal_share"] < 1.0 or t["int4"]["top1_agreement"] < 1.0
