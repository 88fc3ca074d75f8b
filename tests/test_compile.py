"""--compile (torch.compile, inductor's C++ backend on CPU) produces exactly the eager engine's tokens: AR and
EAGLE-2, greedy and seeded sampling; prompts of different lengths reuse the compiled graphs (prefill is bucketed)."""
import pytest
from fasteagle.engine import SpecEngine
from fasteagle.sampling import SamplingParams
from tiny import predictable_pair

PROMPTS = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2]]  # buckets 16, 16, 32
SAMPLED = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def pair():
    return predictable_pair(2.0, vocab=64, max_seq_len=128)


def unique_graphs():
    # imported here, not at module level: importing torch._dynamo during collection breaks the Triton
    # interpreter for the kernel tests that run before this module (conftest runs it last)
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("speculative", [False, True], ids=["ar", "eagle2"])
def test_compiled_equals_eager(pair, speculative):
    target, head = pair
    draft = head if speculative else None
    eager = SpecEngine(target, draft, depth=4, top_k=4, total_tokens=16)
    compiled = SpecEngine(target, draft, depth=4, top_k=4, total_tokens=16, compile=True)
    graphs = None
    for i, prompt in enumerate(PROMPTS):
        ref = eager.generate(prompt, 30)
        out = compiled.generate(prompt, 30)
        assert out.tokens == ref.tokens
        assert out.accept_lens == ref.accept_lens
        if i == 1:  # same prefill bucket as the first prompt: nothing new was compiled
            assert unique_graphs() == graphs
        graphs = unique_graphs()
    for seed in (0, 1):
        ref = eager.generate(PROMPTS[0], 30, SAMPLED, seed=seed)
        assert compiled.generate(PROMPTS[0], 30, SAMPLED, seed=seed).tokens == ref.tokens
    if speculative:
        assert sum(ref.accept_lens) > len(ref.accept_lens)  # the sampled run did accept drafted tokens
