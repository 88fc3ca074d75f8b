"""llama2.c .bin -> fasteagle checkpoint: stories260K reproduces llama2.c's own greedy output exactly; a version-1
export and a legacy export of the same model convert to the same weights; damaged files are rejected."""
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import fe_greedy
from fasteagle.checkpoint import load_target
from fasteagle.convert.__main__ import main
from fasteagle.convert.llama2c import convert_llama2c
from fasteagle.errors import FastEagleError
from fasteagle.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def stories(shared_dir):
    return shared_dir / "models" / "stories260K"


def test_stories260k_greedy_200(stories, tmp_path):
    out = tmp_path / "stories"
    argv = ["llama2c", str(stories / "stories260K.bin"), str(out), "--tokenizer", str(stories / "tok512.bin")]
    assert main(argv) == 0
    model, cfg = load_target(out, max_seq_len=256)
    assert cfg["source"]["version"] == 0 and model.args.tie_embeddings and model.args.n_kv_heads == 4
    tok = load_tokenizer(out)
    assert tok.bos_id == 1
    # llama2.c's run.c: 200 steps from BOS at temperature 0, printing each piece (it would stop early at BOS).
    ids = fe_greedy(model, [tok.bos_id], 200, eos_ids=(tok.bos_id,))
    assert len(ids) == 200
    expected = (stories / "expected_greedy_200.txt").read_text()
    assert tok.decode(ids) == expected


def random_llama2c_weights(p: dict, seed=0) -> dict:
    """Random weights in llama2.c's own layout (Linear [out, in], interleaved rope rows)."""
    g = torch.Generator().manual_seed(seed)
    d, h, L, hd = p["dim"], p["hidden_dim"], p["n_layers"], p["dim"] // p["n_heads"]
    kv = p["n_kv_heads"] * hd
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = {"tok": r(p["vocab"], d), "norm": r(d), "out": r(p["vocab"], d)}
    for name, shape in [("att_norm", (d,)), ("ffn_norm", (d,)), ("wq", (d, d)), ("wk", (kv, d)), ("wv", (kv, d)),
                        ("wo", (d, d)), ("w1", (h, d)), ("w2", (d, h)), ("w3", (h, d))]:
        w[name] = [r(*shape) for _ in range(L)]
    return w


def _f32(*tensors) -> bytes:
    return b"".join(t.float().contiguous().numpy().astype("<f4").tobytes() for t in tensors)


def write_legacy(path, p, w, shared: bool):
    hd = p["dim"] // p["n_heads"]
    vocab = p["vocab"] if shared else -p["vocab"]
    header = struct.pack("<7i", p["dim"], p["hidden_dim"], p["n_layers"], p["n_heads"], p["n_kv_heads"], vocab,
                         p["seq_len"])
    body = _f32(w["tok"], *w["att_norm"], *w["wq"], *w["wk"], *w["wv"], *w["wo"], *w["ffn_norm"], *w["w1"], *w["w2"],
                *w["w3"], w["norm"], torch.randn(p["seq_len"], hd // 2), torch.randn(p["seq_len"], hd // 2))
    path.write_bytes(header + body + (b"" if shared else _f32(w["out"])))


def write_v1(path, p, w, shared: bool):
    header = struct.pack("<Ii7iB", 0x616B3432, 1, p["dim"], p["hidden_dim"], p["n_layers"], p["n_heads"],
                         p["n_kv_heads"], p["vocab"], p["seq_len"], int(shared))
    header += b"\0" * (256 - len(header))
    body = _f32(*w["att_norm"], *w["ffn_norm"], w["norm"], w["tok"], *w["wq"], *w["wk"], *w["wv"], *w["wo"],
                *w["w1"], *w["w2"], *w["w3"])
    path.write_bytes(header + body + (b"" if shared else _f32(w["out"])))


P = dict(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab=512, seq_len=64)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_version1_equals_legacy(stories, tmp_path, shared):
    w = random_llama2c_weights(P)
    write_legacy(tmp_path / "legacy.bin", P, w, shared)
    write_v1(tmp_path / "v1.bin", P, w, shared)
    tok = stories / "tok512.bin"
    convert_llama2c(tmp_path / "legacy.bin", tmp_path / "a", tokenizer=tok)
    convert_llama2c(tmp_path / "v1.bin", tmp_path / "b", tokenizer=tok)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ("output.weight" in a) == (not shared)
    assert torch.equal(a["embed.weight"], w["tok"]) and torch.equal(a["layers.1.mlp.w2.weight"], w["w2"][1])
    # rope layout: llama2.c rotates rows (2i, 2i+1) of each head; we store them as (i, i + head_dim/2)
    hd = P["dim"] // P["n_heads"]
    assert torch.equal(a["layers.0.attn.wq.weight"][hd // 2], w["wq"][0][1])
    assert torch.equal(a["layers.0.attn.wk.weight"][hd + 1], w["wk"][0][hd + 2])
    model, cfg = load_target(tmp_path / "b", max_seq_len=32)
    assert cfg["source"]["version"] == 1 and model.args.tie_embeddings == shared


def test_default_tokenizer_beside_checkpoint(stories, tmp_path):
    shutil.copy(stories / "stories260K.bin", tmp_path / "model.bin")
    with pytest.raises(FastEagleError, match="tokenizer file not found"):
        convert_llama2c(tmp_path / "model.bin", tmp_path / "out")
    shutil.copy(stories / "tok512.bin", tmp_path / "tokenizer.bin")
    convert_llama2c(tmp_path / "model.bin", tmp_path / "out")
    _, cfg = load_target(tmp_path / "out", max_seq_len=8)
    assert cfg["source"]["tokenizer"] == str((tmp_path / "tokenizer.bin").resolve())
    assert (tmp_path / "out" / "tokenizer.bin").read_bytes() == (stories / "tok512.bin").read_bytes()


def test_truncated_bin(stories, tmp_path, capsys):
    data = (stories / "stories260K.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-4096])
    argv = ["llama2c", str(tmp_path / "t.bin"), str(tmp_path / "out"), "--tokenizer", str(stories / "tok512.bin")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "truncated" in err and f"{len(data)} bytes" in err
    assert not (tmp_path / "out").exists()


def test_unsupported_version(stories, tmp_path):
    (tmp_path / "v2.bin").write_bytes(struct.pack("<Ii", 0x616B3432, 2) + b"\0" * 300)
    with pytest.raises(FastEagleError, match="version 2 is not supported"):
        convert_llama2c(tmp_path / "v2.bin", tmp_path / "out", tokenizer=stories / "tok512.bin")


def test_garbage_header(stories, tmp_path):
    (tmp_path / "junk.bin").write_bytes(np.full(64, -7, dtype="<i4").tobytes())
    with pytest.raises(FastEagleError, match="not a llama2.c checkpoint"):
        convert_llama2c(tmp_path / "junk.bin", tmp_path / "out", tokenizer=stories / "tok512.bin")
