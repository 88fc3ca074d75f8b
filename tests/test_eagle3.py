"""EAGLE-3 heads: one written in the reference's published layout (SafeAILab/EAGLE `cnets.py` names, d2t/t2d, a
config without rope_theta) converts; the converted head computes what an independent re-implementation of the
reference's forward computes; the target hands it the residual streams entering the tapped layers; and EAGLE-3
greedy decoding equals plain greedy decoding token for token over dynamic and static trees, with target choices
outside the draft vocabulary, EOS and max_new_tokens inside an accepted path."""
import copy
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from fasteagle.checkpoint import atomic_output_dir, write_checkpoint
from fasteagle.convert.eagle import convert_eagle
from fasteagle.draft import load_draft
from fasteagle.eagle3 import Eagle3Head, default_taps
from fasteagle.engine import SpecEngine
from fasteagle.errors import FastEagleError
from fasteagle.model import causal_mask
from test_spec_greedy import mid_round_stop, prompts
from tiny import random_target

DIM, VOCAB, HEADS, KV, FFN, LAYERS, EPS = 32, 16, 4, 2, 64, 8, 1e-6
DRAFT_IDS = [0, 1, 2, 3, 5, 7, 8, 11, 12, 14]  # the draft vocabulary: 10 of the 16 target ids


def published_state(seed=0, draft_ids=DRAFT_IDS):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    hd = DIM // HEADS
    ids = torch.tensor(draft_ids)
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[ids] = True
    return {
        "fc.weight": r(DIM, 3 * DIM),
        "midlayer.self_attn.q_proj.weight": r(HEADS * hd, 2 * DIM),
        "midlayer.self_attn.k_proj.weight": r(KV * hd, 2 * DIM),
        "midlayer.self_attn.v_proj.weight": r(KV * hd, 2 * DIM),
        "midlayer.self_attn.o_proj.weight": r(DIM, HEADS * hd),
        "midlayer.mlp.gate_proj.weight": r(FFN, DIM),
        "midlayer.mlp.up_proj.weight": r(FFN, DIM),
        "midlayer.mlp.down_proj.weight": r(DIM, FFN),
        "midlayer.input_layernorm.weight": 1 + r(DIM),
        "midlayer.hidden_norm.weight": 1 + r(DIM),
        "midlayer.post_attention_layernorm.weight": 1 + r(DIM),
        "norm.weight": 1 + r(DIM),
        "lm_head.weight": 3 * r(len(draft_ids), DIM),
        "d2t": ids - torch.arange(len(draft_ids)),
        "t2d": t2d,
    }


def published_config(**kw):
    # the reference's EAGLE-3 config fields; no rope_theta (the reference then uses base 10000)
    return {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": DIM, "intermediate_size": FFN,
            "num_attention_heads": HEADS, "num_key_value_heads": KV, "num_hidden_layers": 1, "rms_norm_eps": EPS,
            "vocab_size": VOCAB, "draft_vocab_size": len(DRAFT_IDS), "max_position_embeddings": 512,
            "hidden_act": "silu", "torch_dtype": "float32", **kw}


def write_head(path, state, config):
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file(state, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    target = random_target(seed=7, vocab=VOCAB, dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV)
    out = tmp_path_factory.mktemp("eagle3") / "target"
    with atomic_output_dir(out) as tmp:
        write_checkpoint(tmp, {"kind": "target", "model": target.args.to_dict()}, target.state_dict())
    return out


@pytest.fixture(scope="module")
def converted(target_dir, tmp_path_factory):
    """(target, head, the published state) for the head converted from the published layout."""
    from fasteagle.checkpoint import load_target

    root = tmp_path_factory.mktemp("eagle3-head")
    state = published_state()
    convert_eagle(write_head(root / "published", state, published_config()), root / "head", target_dir)
    target, _ = load_target(target_dir, max_seq_len=256)
    return target, load_draft(root / "head", target), state


def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def rope(x, pos, base=10000.0):  # x [T, H, D], Hugging Face rotate-half layout
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).float()[:, None], torch.cat([ang.sin()] * 2, -1).float()[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(W, feats, tokens, embed):
    """The reference's EAGLE-3 forward over one causal sequence at positions 0..T-1, written from cnets.py:
    fc, then cat(input_layernorm(emb), hidden_norm(x)) into attention, the residual from x, post-attention norm,
    MLP, the final norm and the head's own lm_head. Returns [T, V_d] logits."""
    T, hd = tokens.shape[0], DIM // HEADS
    x = feats @ W["fc.weight"].T
    a = torch.cat([rms(embed[tokens], W["midlayer.input_layernorm.weight"]),
                   rms(x, W["midlayer.hidden_norm.weight"])], -1)
    pos = torch.arange(T)
    q = rope((a @ W["midlayer.self_attn.q_proj.weight"].T).view(T, HEADS, hd), pos)
    k = rope((a @ W["midlayer.self_attn.k_proj.weight"].T).view(T, KV, hd), pos)
    v = (a @ W["midlayer.self_attn.v_proj.weight"].T).view(T, KV, hd)
    k, v = k.repeat_interleave(HEADS // KV, 1), v.repeat_interleave(HEADS // KV, 1)  # repeat_kv
    s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("hts,shd->thd", s.softmax(-1), v).reshape(T, DIM)
    h = x + o @ W["midlayer.self_attn.o_proj.weight"].T
    m = rms(h, W["midlayer.post_attention_layernorm.weight"])
    out = h + (F.silu(m @ W["midlayer.mlp.gate_proj.weight"].T) * (m @ W["midlayer.mlp.up_proj.weight"].T)) @ \
        W["midlayer.mlp.down_proj.weight"].T
    return rms(out, W["norm.weight"]) @ W["lm_head.weight"].T


def test_target_taps_are_the_residual_streams_entering_the_layers(converted):
    target, head, _ = converted
    assert head.taps == default_taps(LAYERS) == (2, 4, 5)
    seen = {}
    hooks = [target.layers[i].register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].clone()))
             for i in head.taps]
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9 % VOCAB]])
    zero = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        hidden, feats = target(tokens, torch.arange(6)[None], zero, causal_mask(6), taps=head.taps)
        plain = target(tokens, torch.arange(6)[None], zero, causal_mask(6))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(feats, torch.cat([seen[i] for i in head.taps], -1), rtol=0, atol=0)
    torch.testing.assert_close(hidden, plain, rtol=0, atol=0)


def test_converted_head_computes_the_reference_forward(converted):
    target, head, W = converted
    assert head.vocab_ids.tolist() == DRAFT_IDS
    T = 7
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(T, 3 * DIM, generator=g)
    tokens = torch.randint(0, VOCAB, (T,), generator=g)
    head.setup_cache(64)
    with torch.no_grad():
        out = head(tokens[None], feats[None], torch.arange(T)[None], torch.zeros(1, dtype=torch.long), causal_mask(T))
        ours = head.logits(out[0])
        ref = reference_logits(W, feats, tokens, target.embed.weight)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    logp, ids = head.topk(out[0], 3)  # target ids, from the draft vocabulary only
    assert set(ids.flatten().tolist()) <= set(DRAFT_IDS)
    torch.testing.assert_close(logp, ref.log_softmax(-1).topk(3).values, rtol=1e-4, atol=1e-4)


SHAPES = [(1, 1, 2), (2, 2, 5), (3, 4, 12), (4, 4, 16), (5, 8, 40), (6, 1, 7)]


@pytest.mark.parametrize("tree,shape", [("dynamic", s) for s in SHAPES] + [("static", None)])
def test_eagle3_greedy_equals_plain_greedy(converted, tree, shape):
    target, head, _ = converted
    depth, top_k, total = shape or (6, 10, 60)
    ar = SpecEngine(target)
    spec = SpecEngine(target, head, tree=tree, depth=depth, top_k=top_k, total_tokens=total)
    lens, outside = Counter(), 0
    for prompt in prompts(6, VOCAB, seed=depth + top_k):
        ref = ar.generate(prompt, 40)
        out = spec.generate(prompt, 40)
        assert out.tokens == ref.tokens, prompt
        lens.update(out.accept_lens)
        outside += sum(t not in DRAFT_IDS for t in ref.tokens)
    assert outside > 0  # the target chose tokens the draft can never propose, and the output still matched
    assert max(lens) <= depth + 1
    if top_k > 1:
        assert max(lens) >= 2, lens  # drafted tokens were accepted: the paths were exercised


@pytest.mark.parametrize("stop", ["eos", "max_new_tokens"])
def test_stops_inside_an_accepted_path(converted, stop):
    target, head, _ = converted
    spec = SpecEngine(target, head, depth=4, top_k=8, total_tokens=40)
    found = None
    for prompt in prompts(20, VOCAB, seed=11):
        found = mid_round_stop(spec, prompt)
        if found:
            break
    assert found, "no prompt gave a round emitting 3+ tokens"
    free, cut = found
    if stop == "eos":
        eos = free.tokens[cut]
        first = free.tokens.index(eos)
        ref = SpecEngine(target).generate(prompt, 60, eos_ids=[eos])
        out = spec.generate(prompt, 60, eos_ids=[eos])
        assert out.tokens == ref.tokens == free.tokens[: first + 1] and out.stop_reason == "eos"
    else:
        out = spec.generate(prompt, cut + 1)
        assert out.tokens == free.tokens[: cut + 1] and out.stop_reason == "max_new_tokens"
    assert 1 + sum(out.accept_lens) > len(out.tokens)  # the last round emitted past the stop: cut there


@pytest.mark.parametrize("change,match", [
    (lambda s, c: s.pop("lm_head.weight"), "without lm_head.weight"),
    (lambda s, c: s["d2t"].add_(1), "d2t"),
    (lambda s, c: s.__setitem__("t2d", torch.zeros(VOCAB, dtype=torch.bool)), "draft vocabulary"),
    (lambda s, c: c.__setitem__("rope_scaling", {"type": "linear", "factor": 2.0}), "rope_scaling"),
    (lambda s, c: c.__setitem__("eagle_aux_hidden_state_layer_ids", [1, 3, 9]), "feature layers"),
    (lambda s, c: s.__setitem__("midlayer.extra.weight", torch.zeros(2)), "unexpected tensor"),
    (lambda s, c: s.__setitem__("fc.weight", torch.zeros(DIM, 2 * DIM)), "fc.weight has shape"),
])
def test_bad_published_heads_fail_in_one_line(tmp_path, target_dir, change, match):
    state, config = published_state(), published_config()
    change(state, config)
    src = write_head(tmp_path / "published", state, config)
    with pytest.raises(FastEagleError, match=match):
        convert_eagle(src, tmp_path / "head", target_dir)
    assert not (tmp_path / "head").exists()  # nothing half-written


def test_config_layer_ids_are_used(tmp_path, target_dir):
    src = write_head(tmp_path / "published", published_state(),
                     published_config(eagle_aux_hidden_state_layer_ids=[1, 3, 6]))
    convert_eagle(src, tmp_path / "head", target_dir)
    cfg = json.loads((tmp_path / "head" / "config.json").read_text())
    assert cfg["head_arch"] == "eagle3" and cfg["taps"] == [1, 3, 6]


def test_taps_must_be_distinct_and_ordered():
    from fasteagle.model import ModelArgs

    with pytest.raises(FastEagleError):
        Eagle3Head(ModelArgs(dim=DIM, n_heads=HEADS, n_kv_heads=KV, head_dim=8, n_layers=1), 4, (3, 3, 5))


@pytest.mark.parametrize("shape", [(1, 4, 5), (3, 4, 12)])
def test_calibration_replays_eagle3_rounds(converted, shape):
    """calibrate's replay (fed the tapped features by generate_batch) finds the engine's accept lengths."""
    from fasteagle.autotune import Shape
    from fasteagle.train.calibrate import replay
    from fasteagle.train.data import generate_batch

    target, head, _ = converted
    s = Shape(*shape)
    engine, n, rounds = SpecEngine(target, head, depth=s.depth, top_k=s.top_k, total_tokens=s.total_tokens), 30, 0
    engine_cache = head.max_seq_len
    for p in prompts(3, VOCAB, seed=4):
        ran = engine.generate(p, n)
        (toks, feats), = generate_batch(target, [p], n, taps=head.taps)
        target.setup_cache(256)  # generate_batch left its own cache behind
        assert feats.shape[1] == 3 * DIM and toks[len(p):].tolist() == ran.tokens
        replayed = replay(head, toks, feats, len(p), [s])[s]
        head.setup_cache(engine_cache)  # replay sized the head's cache to the answer: give the engine its own back
        assert replayed[:-1] == ran.accept_lens[:-1] and replayed[-1] <= ran.accept_lens[-1]
        rounds += len(replayed)
    assert rounds < 3 * (n - 1)


def test_int8_head_keeps_fc_fp32(converted):
    """CPU int8 draft copies (the engine's default): every weight but fc's, whose input is the target's raw residual
    streams (per-tensor int8 activations lose everything but a huge channel's value: SmolLM2 EAGLE-3 head tau 1.42
    vs 2.19, too subtle for a tiny random head, hence the structural check); the int8 head stays close to fp32."""
    head = copy.deepcopy(converted[1])
    T, width = 6, head.fc.weight.shape[1]
    torch.manual_seed(0)
    feats = torch.randn(1, T, width)
    feats[..., 3] *= 300.0  # a massive-activation channel
    tokens = torch.randint(0, head.args.vocab_size, (1, T))
    args = (tokens, feats, torch.arange(T)[None], torch.zeros(1, dtype=torch.long), causal_mask(T))
    head.setup_cache(16)
    ref = head(*args)
    assert head.quantize(True, min_numel=0)
    assert head.fc.qpacked is None and head.lm_head.qpacked is not None
    head.setup_cache(16)
    q = head(*args)
    assert torch.allclose(q, ref, atol=0.1 * ref.abs().max().item()), (q - ref).abs().max()
    head.quantize(False)
