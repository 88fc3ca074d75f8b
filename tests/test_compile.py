"""--compile (torch.compile, inductor's C++ backend on CPU) produces exactly the eager engine's tokens and survives real
use: an AR and an EAGLE-2 engine in one process, ten prompt lengths over every prefill bucket, greedy and sampled
runs with changing temperature / top-k / top-p, without reaching dynamo's recompile limit (fullgraph=True fails
there); other prompt lengths in the same buckets and new sampling numbers reuse the compiled graphs. And compiled
forwards write the KV cache in place: the generated code allocates no buffer the size of a layer's cache, and call
the CPU few-row GEMM kernel where it builds (the draft head's weight-only int8 variant too). An EAGLE-3
head compiles into the same round and decodes exactly as in eager mode, and so do the other target families
(Mixtral, Mistral's window, Qwen3)."""
import math
import random
import re
from collections import Counter

import pytest

from fasteagle.engine import SpecEngine
from fasteagle.linear import skinny_available
from fasteagle.sampling import SamplingParams
from tiny import predictable_pair

# max_seq_len 128: prefill buckets 16, 32, 64, 128; every bucket gets a greedy and a sampled prompt
LENGTHS = [1, 3, 9, 16, 17, 30, 33, 64, 65, 100]
# one sampling kind (top-k bucket 32, top-p on) with different numbers: compiled once
SAMPLED = [SamplingParams(0.8, top_k=20, top_p=0.9), SamplingParams(1.1, top_k=30, top_p=0.7),
           SamplingParams(0.6, top_k=17, top_p=0.95)]
TREE = dict(depth=4, top_k=4, total_tokens=16)


def unique_graphs():
    # imported here, not at module level: importing torch._dynamo during collection breaks the Triton
    # interpreter for the kernel tests that run before this module (conftest runs it last)
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_equals_eager_across_buckets_settings_and_engines():
    target, head = predictable_pair(2.0, vocab=64, max_seq_len=128)
    engines = [(SpecEngine(target, draft, **TREE), SpecEngine(target, draft, compile=True, **TREE))
               for draft in (None, head)]
    rng = random.Random(0)

    def check(n, params, seed):
        prompt = [rng.randrange(64) for _ in range(n)]
        for eager, compiled in engines:
            ref = eager.generate(prompt, 12, params, seed=seed)
            out = compiled.generate(prompt, 12, params, seed=seed)
            assert (out.tokens, out.accept_lens) == (ref.tokens, ref.accept_lens), (n, params)
            lens.update(out.accept_lens)

    lens = Counter()
    for i, n in enumerate(LENGTHS):  # 2 engines x 4 buckets x 2 kinds: 16 prefill graphs, twice dynamo's default 8
        check(n, SamplingParams() if i % 2 == 0 else SAMPLED[i // 2 % 3], seed=i)
    assert max(lens) > 1  # drafted tokens were accepted
    graphs = unique_graphs()
    for n, params in ((5, SamplingParams(0.7, top_k=25, top_p=0.8)), (50, SamplingParams()),
                      (90, SamplingParams(1.3, top_k=32, top_p=0.5))):
        check(n, params, seed=n)
    assert unique_graphs() == graphs  # nothing new was compiled


@pytest.mark.parametrize("speculative", [False, True], ids=["ar", "eagle2"])
def test_compiled_forwards_copy_no_cache_buffer(speculative):
    """Inductor clones and copies back a whole cache buffer on every forward when the cache is written with scatter_
    or through views of one shared buffer (see fasteagle/model.py). One layer's K cache here is
    Hkv x max_seq_len x head_dim = 2 x 1024 x 8 elements; every other buffer of these graphs is far smaller
    (the key window of attention is 16 or 128 slots), so no allocation may reach that size."""
    from torch._inductor.utils import run_and_get_code

    target, head = predictable_pair(2.0, vocab=64, max_seq_len=1024)
    engine = SpecEngine(target, head if speculative else None, compile=True, **TREE)
    out, codes = run_and_get_code(engine.generate, [3, 1, 4, 1, 5], 8)
    assert len(out.tokens) == 8 and len(codes) >= 2  # prefill, and the decode step or the round
    code = "\n".join(codes)
    sizes = [math.prod(int(x) for x in shape.split(",") if x.strip())
             for shape in re.findall(r"empty_strided_\w+\(\(([^()]*)\)", code)]
    cache_numel = target.args.n_kv_heads * 1024 * target.args.head_dim
    assert sizes and max(sizes) < cache_numel, sorted(sizes)[-4:]
    if skinny_available():  # the few-row projections run the CPU GEMM kernel inside the graphs too
        assert "fasteagle_cpu.skinny_linear" in code


@pytest.mark.skipif(not skinny_available(), reason="the skinny GEMM kernel does not build here")
def test_compiled_int8_head_equals_plain_decoding():
    """Compiled, the head runs through the skinny kernel's weight-only int8 copies (fbgemm's dynamic op does not
    trace): the round's graph calls the int8 kernel, and greedy output equals plain decoding token for token."""
    from torch._inductor.utils import run_and_get_code

    from fasteagle.linear import int8_copies, is_weight_only

    target, head = predictable_pair(2.0, vocab=64, max_seq_len=128)
    assert head.quantize(min_numel=0, weight_only=True)  # tiny weights: int8 only when asked for every size
    compiled, ar = SpecEngine(target, head, compile=True, **TREE), SpecEngine(target)
    copies = int8_copies(head) + [head.head_qpacked]
    assert len(copies) >= 4 and all(is_weight_only(q) for q in copies)
    lens = Counter()
    for i in range(3):
        prompt = [(5 * i + 3 * j + 1) % 64 for j in range(6 + 7 * i)]
        out, codes = run_and_get_code(compiled.generate, prompt, 24)
        assert out.tokens == ar.generate(prompt, 24).tokens, prompt
        lens.update(out.accept_lens)
        if i == 0:
            assert "fasteagle_cpu.skinny_linear_int8" in "\n".join(codes)
    assert max(lens) > 1


def test_compiled_eagle3_equals_eager():
    """An EAGLE-3 head (features from three target layers, its own draft vocabulary) in the compiled round."""
    import torch

    from fasteagle.eagle3 import Eagle3Head
    from fasteagle.model import ModelArgs
    from tiny import random_target

    target = random_target(seed=3, vocab=32, n_layers=8, max_seq_len=128)
    torch.manual_seed(4)
    head = Eagle3Head(ModelArgs(**{**target.args.to_dict(), "n_layers": 1}), 12, (2, 4, 5)).eval()
    head.draft_vocab.copy_(torch.randperm(32)[:12])
    head.bind(target)
    eager, compiled = (SpecEngine(target, head, compile=c, **TREE) for c in (False, True))
    lens = Counter()
    for i, params in enumerate([SamplingParams(), SAMPLED[0]]):
        prompt = [(7 * i + 3 * j) % 32 for j in range(5 + 9 * i)]
        ref = eager.generate(prompt, 16, params, seed=i)
        out = compiled.generate(prompt, 16, params, seed=i)
        assert (out.tokens, out.accept_lens) == (ref.tokens, ref.accept_lens), params
        lens.update(out.accept_lens)
    assert max(lens) > 1


def test_compiled_equals_eager_other_families():
    """One target with all three families' features (Mixtral's experts: a gathered and a dense path by shape;
    Mistral's sliding window, shorter than the prompts; Qwen3's q/k norms): compiled EAGLE-2 (its prefill is AR's
    graph) gives the eager engine's tokens, greedy and sampled."""
    from test_targets import FAMILIES, random_norms

    target, head = predictable_pair(2.0, vocab=64, max_seq_len=128, **FAMILIES["mixtral_window_qk_norm"])
    random_norms(target)
    lens = Counter()
    eager, compiled = (SpecEngine(target, head, compile=c, **TREE) for c in (False, True))  # prefill: AR's graph
    for i, params in enumerate([SamplingParams(), SAMPLED[0]]):
        prompt = [(5 * i + 3 * j + 1) % 64 for j in range(7 + 12 * i)]  # 7 and 19 tokens: two buckets
        ref = eager.generate(prompt, 20, params, seed=i)
        out = compiled.generate(prompt, 20, params, seed=i)
        assert (out.tokens, out.accept_lens) == (ref.tokens, ref.accept_lens), params
        lens.update(out.accept_lens)
    assert max(lens) > 1


def test_cpp_wrapper_compiles_the_same_tokens(monkeypatch):
    """--cpp-wrapper (inductor's C++ wrapper, CPU) changes how a compiled graph calls its kernels, not what they
    compute: a compiled EAGLE-2 engine built with it gives eager's tokens. The flag needs --compile on the CPU, and
    compiled cost tables timed with it are kept under their own key."""
    import argparse

    import torch

    from fasteagle import autotune
    from fasteagle.cli import apply_compile_flags
    from fasteagle.errors import FastEagleError

    for bad in (dict(compile=False, device="cpu"), dict(compile=True, device="cuda")):
        with pytest.raises(FastEagleError, match="--cpp-wrapper needs --compile on the CPU"):
            apply_compile_flags(argparse.Namespace(cpp_wrapper=True, **bad))
    cfg = torch._inductor.config
    for knob in ("cpp_wrapper", "cpp_wrapper_build_separate"):
        monkeypatch.setattr(cfg, knob, False)  # restored after the test
    target, head = predictable_pair(2.0, vocab=64, max_seq_len=80)  # a cache size no other test compiles
    key = autotune.costs_key(target, head, compiled=True)
    apply_compile_flags(argparse.Namespace(cpp_wrapper=True, compile=True, device="cpu"))
    assert cfg.cpp_wrapper and cfg.cpp_wrapper_build_separate
    assert autotune.costs_key(target, head, compiled=True) != key
    graphs = unique_graphs()
    prompt = list(range(5, 25))
    ref = SpecEngine(target, head, **TREE).generate(prompt, 16)
    out = SpecEngine(target, head, compile=True, **TREE).generate(prompt, 16)
    assert (out.tokens, out.accept_lens) == (ref.tokens, ref.accept_lens) and max(out.accept_lens) > 1
    assert unique_graphs() > graphs  # compiled here, with the wrapper on
