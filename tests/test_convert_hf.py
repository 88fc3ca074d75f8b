"""HF model directory -> fasteagle checkpoint: logit parity with transformers on tiny random models of every
supported architecture and storage variant, KV-cache decoding, greedy generation, and bad-input errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CHAT_TEMPLATE, fe_greedy, fe_incremental_logits, fe_logits, save_hf_tokenizer
from fasteagle.checkpoint import load_target
from fasteagle.convert.__main__ import main
from fasteagle.convert.hf import model_args_from_hf
from fasteagle.errors import FastEagleError

transformers = pytest.importorskip("transformers")

VOCAB = 320  # = the tiny tokenizer's size
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # short original context: all three frequency bands occur

# name -> (config class, config kwargs, how to save)
CASES = {
    "llama2_mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4), "safetensors"),
    "llama31_gqa_rope_scaling": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE}), "safetensors"),
    "qwen2_bias_tied": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
                        "bin"),
    "smollm2_like_tied_sharded": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}), "sharded_safetensors"),
    "mistral_sharded_bin": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=4096,
                                                  max_position_embeddings=32768), "sharded_bin"),
    # a window shorter than the 40-token prompt and the 8 + 32 tokens generated: the window is exercised in
    # prefill, in decode and across the prefill/decode boundary
    "mistral_window_7": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=7),
                         "safetensors"),
    "qwen2_window_all_layers": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                                    use_sliding_window=True, max_window_layers=0), "safetensors"),
    "mixtral_4_experts_top2": ("MixtralConfig", dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                                     num_experts_per_tok=2), "sharded_safetensors"),
    "qwen3_qk_norm": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32), "safetensors"),
}
WINDOWS = {"mistral_sharded_bin": 4096, "mistral_window_7": 7, "qwen2_window_all_layers": 6}


def make_hf_model(config_cls: str, seed=0, **kw):
    """A tiny random model whose weights are large enough that greedy decoding is not degenerate, with random
    norm weights and biases (so swapped norms or dropped biases would show in the logits)."""
    base = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB, initializer_range=0.2,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
    config = getattr(transformers, config_cls)(**{**base, **kw})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def save_bin_shards(model, src, n_shards: int):
    """transformers 5 only writes safetensors: write pytorch_model.bin (optionally sharded + index) ourselves."""
    model.config.save_pretrained(str(src))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if n_shards == 1:  # the pre-zipfile format old checkpoints use (cannot be memory-mapped)
        torch.save(state, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
        return
    names = list(state)
    weight_map = {}
    for i in range(n_shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = names[i::n_shards]
        torch.save({k: state[k] for k in part}, src / fname)
        weight_map.update({k: fname for k in part})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save_model(model, src, how: str):
    src.mkdir(parents=True, exist_ok=True)
    if how == "safetensors":
        model.save_pretrained(str(src))
    elif how == "sharded_safetensors":
        model.save_pretrained(str(src), max_shard_size="100KB")
        assert (src / "model.safetensors.index.json").is_file()
    elif how == "bin":
        save_bin_shards(model, src, 1)
    elif how == "sharded_bin":
        save_bin_shards(model, src, 3)
    save_hf_tokenizer(src)


def convert(src, out, *extra):
    assert main(["hf", str(src), str(out), *extra]) == 0
    return load_target(out, max_seq_len=128)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_parity(case, tmp_path):
    cls, kw, how = CASES[case]
    hf = make_hf_model(cls, **kw)
    src, out = tmp_path / "src", tmp_path / "out"
    save_model(hf, src, how)
    model, cfg = convert(src, out)

    args = model.args
    assert args.sliding_window == WINDOWS.get(case)
    assert args.qk_norm == (cls == "Qwen3Config")
    assert (args.n_experts, args.n_experts_per_tok) == ((4, 2) if cls == "MixtralConfig" else (0, 2))
    assert cfg["format"] == "fasteagle-v1" and cfg["kind"] == "target"
    assert args.tie_embeddings == hf.config.tie_word_embeddings and (model.output is None) == args.tie_embeddings
    assert args.qkv_bias == (cls == "Qwen2Config")
    assert args.head_dim == kw.get("head_dim", 16)
    if "rope" in case:
        assert args.rope_scaling == LLAMA3_ROPE and args.rope_theta == 500000.0

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (40,), generator=g).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    full = fe_logits(model, ids)
    assert (full - ref).abs().max() < 1e-4

    inc = fe_incremental_logits(model, ids, n_prefill=17)
    assert (inc - full).abs().max() < 1e-4  # fp32 summation order differs between T=1 and T=40

    prompt = ids[:8]
    hf_out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert fe_greedy(model, prompt, 32) == hf_out
    assert len(set(hf_out)) > 4  # the comparison is not between two degenerate repeats


def test_hf_dtype_and_tokenizer(tmp_path):
    """--dtype is honoured and the tokenizer travels with the checkpoint."""
    hf = make_hf_model("LlamaConfig", num_attention_heads=4, num_key_value_heads=2)
    src, out = tmp_path / "src", tmp_path / "out"
    save_model(hf, src, "safetensors")
    assert main(["hf", str(src), str(out), "--dtype", "bfloat16"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source"]["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    assert cfg["eos_token_ids"] == [2] and cfg["chat_template_jinja"] == CHAT_TEMPLATE
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask

    from fasteagle.tokenizer import load_tokenizer
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(src))
    tok = load_tokenizer(out)
    text = "The quick brown fox, Lily!"
    assert tok.encode(text, bos=False) == ref.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text, bos=False)) == text
    chat = [{"role": "user", "content": text}]
    assert tok.encode_chat(chat) == list(ref.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])


def test_hf_old_style_rope_keys():
    """Hub configs written by transformers 4 use rope_theta + rope_scaling instead of rope_parameters."""
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100,
           "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE, "rope_type": None, "type": "llama3"},
           "max_position_embeddings": 512}
    args, _ = model_args_from_hf(cfg, "cfg")
    assert args.rope_theta == 500000.0 and args.rope_scaling == LLAMA3_ROPE and args.head_dim == 16


# --- bad input: one test per case ---------------------------------------------------------------------------


@pytest.fixture
def llama_src(tmp_path):
    hf = make_hf_model("LlamaConfig", num_attention_heads=4, num_key_value_heads=2)
    src = tmp_path / "src"
    save_model(hf, src, "safetensors")
    return src


def run_failing(capsys, argv, *needles):
    """The CLI returns 1, prints one 'error: ...' line naming the problem, and leaves no OUT_DIR behind."""
    out_dir = argv[2]
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, err
    from pathlib import Path

    out_dir = Path(out_dir)
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]  # no temp dirs
    return err


def test_load_target_rejects_non_checkpoint(tmp_path, llama_src):
    with pytest.raises(FastEagleError, match="not a fasteagle checkpoint"):
        load_target(llama_src.parent)  # a directory without config.json / model.safetensors
    with pytest.raises(FastEagleError, match="unknown format"):
        load_target(llama_src)  # an HF dir, not converted
    with pytest.raises(FastEagleError, match="not a directory"):
        load_target(tmp_path / "nothing")


def test_missing_src(tmp_path, capsys):
    run_failing(capsys, ["hf", tmp_path / "nope", tmp_path / "out"], "no such file or directory")


def test_src_not_a_model_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    run_failing(capsys, ["hf", tmp_path / "empty", tmp_path / "out"], "no config.json")


def test_unsupported_architecture(llama_src, tmp_path, capsys):
    cfg = json.loads((llama_src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (llama_src / "config.json").write_text(json.dumps(cfg))
    run_failing(capsys, ["hf", llama_src, tmp_path / "out"], "unsupported architecture", "GPT2LMHeadModel")


def test_unsupported_rope_scaling(llama_src, tmp_path, capsys):
    cfg = json.loads((llama_src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0}
    (llama_src / "config.json").write_text(json.dumps(cfg))
    run_failing(capsys, ["hf", llama_src, tmp_path / "out"], "'yarn'", "not supported")


def test_truncated_safetensors(llama_src, tmp_path, capsys):
    f = llama_src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    run_failing(capsys, ["hf", llama_src, tmp_path / "out"], "model.safetensors", "truncated")


def test_truncated_pytorch_bin(tmp_path, capsys):
    hf = make_hf_model("LlamaConfig", num_attention_heads=4, num_key_value_heads=2)
    src = tmp_path / "src"
    save_model(hf, src, "bin")
    f = src / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    run_failing(capsys, ["hf", src, tmp_path / "out"], "pytorch_model.bin", "truncated or corrupt")


def test_shape_mismatch(llama_src, tmp_path, capsys):
    cfg = json.loads((llama_src / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (llama_src / "config.json").write_text(json.dumps(cfg))
    run_failing(capsys, ["hf", llama_src, tmp_path / "out"], "model.layers.0.mlp", "(128, 64)", "(96, 64)")


def test_missing_tensor(llama_src, tmp_path, capsys):
    f = llama_src / "model.safetensors"
    state = load_file(str(f))
    del state["model.layers.1.post_attention_layernorm.weight"]
    save_file(state, str(f), metadata={"format": "pt"})
    run_failing(capsys, ["hf", llama_src, tmp_path / "out"], "missing tensors", "layers.1.mlp_norm.weight")


def test_existing_output_dir_untouched(llama_src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["hf", str(llama_src), str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_no_out_dir_after_failure_while_writing(llama_src, tmp_path, capsys, monkeypatch):
    """A failure after files were partly written (e.g. disk full) leaves neither OUT_DIR nor a temp dir."""
    import fasteagle.convert.common as common

    def broken_write(out_dir, config, state_dict):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise FastEagleError("disk full")

    monkeypatch.setattr(common, "write_checkpoint", broken_write)
    run_failing(capsys, ["hf", llama_src, tmp_path / "out"], "disk full")


def test_no_out_dir_without_tokenizer(llama_src, tmp_path, capsys):
    for f in llama_src.glob("tokenizer*"):
        f.unlink()
    run_failing(capsys, ["hf", llama_src, tmp_path / "out"])


def test_cli_subprocess_error_exit(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fasteagle.convert", "hf", str(tmp_path / "nope"), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and "no such file or directory" in r.stderr and "Traceback" not in r.stderr
