"""A head in the EAGLE reference's exact checkpoint layout converts, fits its target, and drafts losslessly."""
import json

import pytest
import torch

from fasteagle.checkpoint import atomic_output_dir, load_target, write_checkpoint
from fasteagle.convert.eagle import convert_eagle
from fasteagle.draft import load_draft
from fasteagle.engine import SpecEngine
from fasteagle.errors import FastEagleError
from tiny import random_target

DIM, VOCAB, HEADS, KV, FFN = 32, 64, 4, 2, 64


def reference_head_state(seed=0, dim=DIM, vocab=VOCAB, bias=True, extra_norm=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    hd = dim // HEADS
    state = {
        "embed_tokens.weight": r(vocab, dim),
        "fc.weight": r(dim, 2 * dim),
        "layers.0.self_attn.q_proj.weight": r(HEADS * hd, dim),
        "layers.0.self_attn.k_proj.weight": r(KV * hd, dim),
        "layers.0.self_attn.v_proj.weight": r(KV * hd, dim),
        "layers.0.self_attn.o_proj.weight": r(dim, HEADS * hd),
        "layers.0.mlp.gate_proj.weight": r(FFN, dim),
        "layers.0.mlp.up_proj.weight": r(FFN, dim),
        "layers.0.mlp.down_proj.weight": r(dim, FFN),
        "layers.0.post_attention_layernorm.weight": 1 + r(dim),
    }
    if bias:
        state["fc.bias"] = r(dim)
    if extra_norm:
        state["layers.0.input_layernorm.weight"] = torch.ones(dim)
    return state


def reference_head_config(dim=DIM, vocab=VOCAB, bias=True):
    return {"architectures": ["LlamaForCausalLM"], "hidden_size": dim, "intermediate_size": FFN,
            "num_attention_heads": HEADS, "num_key_value_heads": KV, "num_hidden_layers": 1, "rms_norm_eps": 1e-6,
            "vocab_size": vocab, "max_position_embeddings": 512, "rope_theta": 10000.0, "hidden_act": "silu",
            "bias": bias, "torch_dtype": "float32"}


def write_head(path, state, config, safetensors=False):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(path / "model.safetensors"))
    else:
        torch.save(state, path / "pytorch_model.bin")


@pytest.fixture
def target_dir(tmp_path):
    target = random_target(seed=5, vocab=VOCAB, dim=DIM, n_heads=HEADS, n_kv_heads=KV)
    out = tmp_path / "target"
    with atomic_output_dir(out) as tmp:
        write_checkpoint(tmp, {"kind": "target", "model": target.args.to_dict()}, target.state_dict())
    return out


@pytest.mark.parametrize("safetensors,extra_norm", [(False, False), (True, True)])
def test_reference_layout_converts_and_runs(tmp_path, target_dir, safetensors, extra_norm):
    state = reference_head_state(extra_norm=extra_norm)
    write_head(tmp_path / "head", state, reference_head_config(), safetensors)
    convert_eagle(tmp_path / "head", tmp_path / "draft", target_dir)
    target, _ = load_target(target_dir, max_seq_len=256)
    head = load_draft(tmp_path / "draft", target)
    torch.testing.assert_close(head.fc.weight, state["fc.weight"])
    torch.testing.assert_close(head.fc.bias, state["fc.bias"])
    torch.testing.assert_close(head.layers[0].attn.wk.weight, state["layers.0.self_attn.k_proj.weight"])
    torch.testing.assert_close(head.layers[0].mlp.w3.weight, state["layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(head.layers[0].mlp_norm.weight, state["layers.0.post_attention_layernorm.weight"])
    assert head.embed_weight is target.embed.weight  # the target's embedding, not the head's copy
    ar = SpecEngine(target).generate([1, 2, 3], 40)
    for tree in ("dynamic", "static"):
        assert SpecEngine(target, head, tree=tree).generate([1, 2, 3], 40).tokens == ar.tokens


def test_head_without_fc_bias(tmp_path, target_dir):
    write_head(tmp_path / "head", reference_head_state(bias=False), reference_head_config(bias=False))
    convert_eagle(tmp_path / "head", tmp_path / "draft", target_dir)
    target, _ = load_target(target_dir, max_seq_len=64)
    assert load_draft(tmp_path / "draft", target).fc.bias is None


@pytest.mark.parametrize("dim,vocab,match", [(48, VOCAB, "hidden size 48"), (DIM, 80, "vocabulary 80")])
def test_head_target_mismatch(tmp_path, target_dir, dim, vocab, match):
    write_head(tmp_path / "head", reference_head_state(dim=dim, vocab=vocab), reference_head_config(dim, vocab))
    with pytest.raises(FastEagleError, match=match):
        convert_eagle(tmp_path / "head", tmp_path / "draft", target_dir)
    assert not (tmp_path / "draft").exists()


def test_draft_for_other_target_rejected_at_load(tmp_path, target_dir):
    write_head(tmp_path / "head", reference_head_state(), reference_head_config())
    convert_eagle(tmp_path / "head", tmp_path / "draft", target_dir)
    other = random_target(vocab=VOCAB + 1, dim=DIM, n_heads=HEADS, n_kv_heads=KV)
    with pytest.raises(FastEagleError, match="does not fit the target"):
        load_draft(tmp_path / "draft", other)
