"""Shared test helpers and fixtures: the shared/ data dir, a tiny byte-level BPE tokenizer, fasteagle-side
forward/decode loops, and the SmolLM2 checkpoint (downloaded and converted once into the user cache that
the CLI uses, $FASTEAGLE_CACHE).

Helpers are plain functions (`from conftest import ...`); expensive things are session fixtures."""
from pathlib import Path

import pytest
import torch

from fasteagle.model import causal_mask

SHARED = Path(__file__).resolve().parents[2] / "shared"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital.",
    "def main(argv=None):\n    return 0\n",
] * 4


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent")
    return SHARED


def tiny_bpe(vocab_size: int = 320):
    """A deterministic byte-level BPE `tokenizers.Tokenizer` (SmolLM2-like specials at ids 0..2), plus its
    vocabulary as a list ordered by id and its merges as "a b" strings (what a GGUF stores)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tok, tokens, merges


def save_hf_tokenizer(out_dir, tok=None):
    """Write tokenizer.json + tokenizer_config.json (with a chat template) the way transformers does."""
    from transformers import PreTrainedTokenizerFast

    tok = tok or tiny_bpe()[0]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast



def write_tiny_model(root, context: int = 512):
    """tests/tiny.py's predictable_pair (a head that often agrees with its target) on disk, over the 320-token
    byte-level BPE vocabulary with a ChatML template -> (target checkpoint, head checkpoint). context: the
    target's max_position_embeddings."""
    from fasteagle.checkpoint import atomic_output_dir, write_checkpoint
    from fasteagle.draft import save_draft
    from fasteagle.tokenizer import export_tokenizer_hf
    from tiny import predictable_pair

    src = root / "hf_tok"
    save_hf_tokenizer(src)
    target, head = predictable_pair(2.0, vocab=320, dim=32)
    ckpt, draft = root / "target", root / "head"
    with atomic_output_dir(ckpt) as tmp:
        entries = export_tokenizer_hf(src, tmp)
        model = {**target.args.to_dict(), "max_position_embeddings": context}
        write_checkpoint(tmp, {"kind": "target", "model": model, **entries}, target.state_dict())
    save_draft(head, draft)
    return ckpt, draft

# --- fasteagle-side reference loops -------------------------------------------------------------------------


@torch.no_grad()
def fe_logits(model, ids) -> torch.Tensor:
    """Logits [T, V] of one full-sequence forward from an empty cache."""
    t = torch.tensor([ids])
    T = t.shape[1]
    hidden = model(t, torch.arange(T)[None], torch.zeros(1, dtype=torch.long), causal_mask(T))
    return model.logits(hidden)[0]


@torch.no_grad()
def fe_incremental_logits(model, ids, n_prefill: int) -> torch.Tensor:
    """Prefill ids[:n_prefill], then feed one token at a time through the KV cache (cache_len advancing)."""
    rows = [fe_logits(model, ids[:n_prefill])]
    for pos in range(n_prefill, len(ids)):
        h = model(torch.tensor([[ids[pos]]]), torch.tensor([[pos]]), torch.tensor([pos]), causal_mask(1))
        rows.append(model.logits(h)[0])
    return torch.cat(rows)


@torch.no_grad()
def fe_greedy(model, prompt, n: int, eos_ids=()) -> list[int]:
    """Greedy decoding: prefill the prompt, then one token per step; stops after n tokens or at an EOS."""
    logits = fe_logits(model, prompt)[-1]
    out, pos = [], len(prompt)
    for _ in range(n):
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt in eos_ids:
            break
        h = model(torch.tensor([[nxt]]), torch.tensor([[pos]]), torch.tensor([pos]), causal_mask(1))
        logits, pos = model.logits(h)[0, -1], pos + 1
    return out


# --- SmolLM2 (the default real model) -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def fasteagle_cache() -> Path:
    """The user cache the CLI uses too (FASTEAGLE_CACHE, default ~/.cache/fasteagle): the model is fetched once."""
    from fasteagle.download import cache_dir

    return cache_dir()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model's checkpoint, exactly the one `python -m fasteagle.generate` uses (converted once)."""
    from fasteagle.download import default_checkpoint

    return default_checkpoint()


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir) -> Path:
    from fasteagle.download import fetch_smollm2_gguf

    return fetch_smollm2_gguf()  # the cached copy the checkpoint was converted from


def pytest_collection_modifyitems(session, config, items):
    """Run the torch.compile tests last: once inductor has run in a process, the Triton interpreter's kernels fail
    there ("Cannot call @triton.jit'd outside of the scope of a kernel"), so test_kernels.py must run before it."""
    items.sort(key=lambda item: item.path.name == "test_compile.py")
