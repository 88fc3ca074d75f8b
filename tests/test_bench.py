"""bench/latency.py end to end on a tiny model (fp32, CPU): JSON schema, plot, losslessness verdicts, resume, a forced
mismatch, the HF baseline, and the random-weights mode on a tiny custom shape.

The target + head are tests/tiny.py's `predictable_pair` (a head that often agrees with the target, so accepted
lengths above 1 occur) over a 320-token byte-level BPE vocabulary with a ChatML template."""
import json
import struct
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench` is not installed

from bench import latency  # noqa: E402
from bench.env import SCHEMA  # noqa: E402
from bench.report import TREES, summarize  # noqa: E402
from fasteagle.questions import load_questions  # noqa: E402
from bench.shapes import PEAK_BANDWIDTH, kv_bytes_per_forward, peak_bandwidth, shape_args  # noqa: E402
from conftest import write_tiny_model  # noqa: E402
from fasteagle.draft import save_draft  # noqa: E402
from fasteagle.errors import FastEagleError  # noqa: E402

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Once upon a time", "What is the capital of France?"]},
    {"question_id": 2, "category": "coding", "turns": ["def main(argv=None):"]},
    {"question_id": 3, "category": "writing", "turns": ["The quick brown fox"]},
]
NEW = 12


@pytest.fixture(autouse=True)
def restore_threads():
    """main() sets torch's thread count (--threads 1: tiny ops on a shared machine are fastest single-threaded)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ckpt, draft = write_tiny_model(root)
    qfile = root / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return ckpt, draft, qfile


def bench_argv(model_dirs, out, *extra):
    ckpt, draft, qfile = model_dirs
    return ["--checkpoint", str(ckpt), "--draft", str(draft), "--questions", str(qfile), "--device", "cpu",
            "--max-new-tokens", str(NEW), "--warmup", "1", "--no-progress", "--threads", "1", "--out", str(out),
            "--total-tokens", "16", *extra]  # a fixed shape: the automatic one may choose AR for tiny models


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return False
    w, h = struct.unpack(">II", data[16:24])
    return w > 100 and h > 100 and data.rstrip(b"\x00")[-8:-4] == b"IEND"


def check_schema(res, methods):
    assert res["schema"] == SCHEMA and res["mode"] == "questions"
    for k in ("date", "commit", "command", "device", "versions", "params", "model", "questions", "lossless",
              "summary", "records", "plot"):
        assert k in res, k
    assert res["device"]["type"] == "cpu" and isinstance(res["device"]["name"], str) and res["device"]["name"]
    assert res["device"]["peak_bandwidth_bytes_per_s"] is None
    assert res["versions"]["torch"] == torch.__version__
    assert res["params"]["max_new_tokens"] == NEW and res["params"]["methods"] == methods
    assert res["params"]["temperature"] == 0.0 and res["params"]["dtype"] == "float32"
    assert res["questions"]["n"] == 3 and res["questions"]["turns"] == 4
    assert res["questions"]["categories"] == {"coding": 1, "writing": 2}
    assert [r["question_id"] for r in res["records"]] == [1, 2, 3]
    for r in res["records"]:
        assert set(r["methods"]) == set(methods)
        n_turns = len(next(q for q in QUESTIONS if q["question_id"] == r["question_id"])["turns"])
        for m, v in r["methods"].items():
            assert len(v["turns"]) == n_turns
            for i, e in enumerate(v["turns"]):
                assert e["turn"] == i and 1 <= e["new_tokens"] <= NEW and e["seconds"] > 0
                assert e["tokens_per_s"] == pytest.approx(e["new_tokens"] / e["seconds"], rel=1e-2)
                assert e["stop_reason"] in ("eos", "max_new_tokens")
                assert isinstance(e["prompt_tokens"], int) and e["prompt_tokens"] > 0
                if m in TREES:
                    assert e["rounds"] == len(e["accept_lens"]) >= 1
                    assert all(1 <= n <= 7 for n in e["accept_lens"])
                    assert e["tau"] == pytest.approx(sum(e["accept_lens"]) / e["rounds"], abs=1e-3)
                    assert e["equal_ar"] is True
                else:
                    assert e["tau"] is None and e["accept_lens"] == []
    # a second turn sees the first answer: its prompt is longer than the first turn's
    t = res["records"][0]["methods"]["ar"]["turns"]
    assert t[1]["prompt_tokens"] > t[0]["prompt_tokens"] + t[0]["new_tokens"] - 1
    s = res["summary"]
    assert set(s["per_category"]) == {"coding", "writing"}
    for block in [s["overall"], *s["per_category"].values()]:
        assert set(block) == set(methods)
        for m, v in block.items():
            for k in ("turns", "new_tokens", "seconds", "tokens_per_s", "tau", "rounds", "accept_len_hist",
                      "speedup_vs_ar", "bandwidth_fraction", "equal_ar"):
                assert k in v, (m, k)
            assert v["bandwidth_fraction"] is None  # CPU: no roofline
            assert v["speedup_vs_ar"] == pytest.approx(v["tokens_per_s"] / block["ar"]["tokens_per_s"], rel=1e-3)
    for m in methods:
        all_turns = [e for r in res["records"] for e in r["methods"][m]["turns"]]
        assert s["overall"][m]["new_tokens"] == sum(e["new_tokens"] for e in all_turns)
        if m in TREES:
            lens = [n for e in all_turns for n in e["accept_lens"]]
            assert s["overall"][m]["tau"] == pytest.approx(sum(lens) / len(lens), abs=1e-3)
            assert sum(s["overall"][m]["accept_len_hist"].values()) == len(lens)
            assert s["overall"][m]["equal_ar"] == {"equal": 4, "compared": 4}


def test_end_to_end_resume_and_schema(model_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "res.json"
    methods = ["ar", "eagle1", "eagle2"]
    # first run: only the first two questions' worth of work gets done before an interrupt
    calls = []
    real = latency.Runner.run_question

    def interrupted(self, q):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(q["question_id"])
        return real(self, q)

    monkeypatch.setattr(latency.Runner, "run_question", interrupted)
    assert latency.main(bench_argv(model_dirs, out)) == 130
    partial = tmp_path / "res.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 2 and not out.exists()
    # the rerun resumes: only question 3 runs
    calls.clear()
    monkeypatch.setattr(latency.Runner, "run_question", lambda self, q: calls.append(q["question_id"]) or
                        real(self, q))
    assert latency.main(bench_argv(model_dirs, out)) == 0
    assert calls == [3]
    assert not partial.exists()
    res = json.loads(out.read_text())
    check_schema(res, methods)
    assert res["lossless"] == {"checked": True, "ok": True, "compared_turns": 8, "mismatches": [],
                               "why_unchecked": None}
    # the predictable head accepts drafts: tau well above 1
    assert res["summary"]["overall"]["eagle2"]["tau"] > 1.5
    png = out.with_suffix(".png")
    assert res["plot"] == png.name and is_png(png)
    png.unlink()
    assert latency.main(["--replot", str(out)]) == 0 and is_png(png)
    assert "lossless: OK" in capsys.readouterr().out
    # a run with the same settings and an existing result file does nothing new
    calls.clear()
    assert latency.main(bench_argv(model_dirs, out)) == 0
    assert calls == []
    # different settings (max-new-tokens) do not reuse the records
    assert latency.main(bench_argv(model_dirs, out, "--limit", "1", "--max-new-tokens", "5", "--methods", "ar")) == 0
    assert calls == [1]


def test_forced_mismatch_is_reported(model_dirs, tmp_path, monkeypatch, capsys):
    """An EAGLE-2 answer that differs from AR must fail the run loudly: summary, exit status, plot title."""
    from fasteagle.engine import SpecEngine

    real = SpecEngine.generate

    def corrupt(self, *a, **kw):
        r = real(self, *a, **kw)
        if self.draft is not None and self.tree_kind == "dynamic" and len(r.tokens) > 3:
            r.tokens[3] = (r.tokens[3] + 1) % 320
        return r

    monkeypatch.setattr(SpecEngine, "generate", corrupt)
    out = tmp_path / "bad.json"
    code = latency.main(bench_argv(model_dirs, out, "--limit", "2", "--turns", "1", "--warmup", "0"))
    assert code == latency.MISMATCH_EXIT
    res = json.loads(out.read_text())
    ll = res["lossless"]
    assert ll["checked"] and ll["ok"] is False and ll["compared_turns"] == 4
    assert {(m["question_id"], m["method"], m["turn"]) for m in ll["mismatches"]} == {(1, "eagle2", 0),
                                                                                       (2, "eagle2", 0)}
    assert all(m["first_difference"] == 3 for m in ll["mismatches"])
    assert res["summary"]["overall"]["eagle2"]["equal_ar"] == {"equal": 0, "compared": 2}
    assert res["summary"]["overall"]["eagle1"]["equal_ar"] == {"equal": 2, "compared": 2}
    captured = capsys.readouterr()
    assert "LOSSLESSNESS FAILURE" in captured.out and "losslessness check failed" in captured.err


def test_unchecked_and_hf_baseline(model_dirs, tmp_path):
    """hf (transformers generate on the same weights) matches AR in fp32; sampling leaves losslessness unchecked."""
    pytest.importorskip("transformers")
    out = tmp_path / "hf.json"
    assert latency.main(bench_argv(model_dirs, out, "--methods", "ar,hf", "--limit", "1", "--warmup", "0")) == 0
    res = json.loads(out.read_text())
    assert res["lossless"]["checked"] is False and "EAGLE" in res["lossless"]["why_unchecked"]
    hf_turns = res["records"][0]["methods"]["hf"]["turns"]
    assert [e["equal_ar"] for e in hf_turns] == [True, True]
    assert res["summary"]["overall"]["hf"]["speedup_vs_ar"] > 0
    out2 = tmp_path / "sampled.json"
    assert latency.main(bench_argv(model_dirs, out2, "--limit", "1", "--temperature", "0.8", "--warmup", "0",
                                   "--methods", "ar,eagle2")) == 0
    res = json.loads(out2.read_text())
    assert res["lossless"]["checked"] is False and res["lossless"]["ok"] is None
    assert "equal_ar" not in res["records"][0]["methods"]["eagle2"]["turns"][0]


@pytest.fixture(scope="module")
def eagle3_dir(model_dirs, tmp_path_factory):
    """A random EAGLE-3 head for the tiny target: taps both layers, proposes 200 of the 320 ids."""
    from fasteagle.checkpoint import load_target
    from fasteagle.eagle3 import Eagle3Head
    from fasteagle.model import ModelArgs

    target, _ = load_target(model_dirs[0], "cpu", torch.float32, 64)
    torch.manual_seed(0)
    head = Eagle3Head(ModelArgs.from_dict({**target.args.to_dict(), "n_layers": 1}), 200, (0, 1))
    head.draft_vocab.copy_(torch.randperm(320)[:200])
    out = tmp_path_factory.mktemp("e3") / "head3"
    save_draft(head, out)
    return out


def test_eagle3_method_side_by_side(model_dirs, eagle3_dir, tmp_path, capsys):
    """--methods ar,eagle2,eagle3: the EAGLE-3 head (--draft3) runs next to the EAGLE-2 head, both lossless, each
    with its own automatic shape choice recorded."""
    out = tmp_path / "e3.json"
    argv = bench_argv(model_dirs, out, "--methods", "ar,eagle2,eagle3", "--draft3", str(eagle3_dir), "--limit", "2",
                      "--turns", "1")
    argv.remove("--total-tokens")
    argv.remove("16")  # the automatic shapes (the tiny model's costs are measured into the test's cache)
    assert latency.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["lossless"]["ok"] is True and res["lossless"]["compared_turns"] == 4
    assert set(res["summary"]["overall"]) >= {"ar", "eagle2", "eagle3"}
    assert res["params"]["draft3"] == str(eagle3_dir) and res["model"]["draft3_info"]["sha256"]
    assert {"eagle2_shape", "eagle3_shape"} <= set(res["params"])
    for m in ("eagle2", "eagle3"):  # each head's measured draft-level cost, by rows expanded, sits beside its shape
        level = res["params"][f"{m}_shape"]["draft_level_ms"]
        assert level and all(float(ms) > 0 for ms in level.values()) and "1" in level
    # the wrong kind of head, or none, fails in one line
    ckpt, draft, qfile = model_dirs
    capsys.readouterr()
    assert latency.main(bench_argv(model_dirs, tmp_path / "x.json", "--methods", "ar,eagle3", "--draft3",
                                   str(draft))) == 1
    assert "not an EAGLE-3 head" in capsys.readouterr().err
    assert latency.main(bench_argv(model_dirs, tmp_path / "y.json", "--methods", "ar,eagle3")) == 1
    assert "pass --draft3" in capsys.readouterr().err


def test_quantized_methods_side_by_side(model_dirs, tmp_path, capsys):
    """--methods ar,eagle2,ar@int8,eagle2@int8,ar@int4: each quantization loads its own target; a quantized EAGLE
    answer is checked against its own target's AR (and is lossless there), speedups are given against the unquantized
    AR and, for quantized methods, against their own AR too."""
    methods = ["ar", "eagle2", "ar@int8", "eagle2@int8", "ar@int4"]
    out = tmp_path / "q.json"
    assert latency.main(bench_argv(model_dirs, out, "--methods", ",".join(methods), "--limit", "2")) == 0
    res = json.loads(out.read_text())
    assert res["params"]["methods"] == methods
    assert res["lossless"]["ok"] is True and res["lossless"]["compared_turns"] == 3 * 2  # eagle2 x 3 turns, twice
    rec = res["records"][0]["methods"]
    assert all(e["equal_ar"] for e in rec["eagle2@int8"]["turns"]) and rec["eagle2@int8"]["turns"][0]["rounds"] >= 1
    assert "equal_ar" not in rec["ar@int8"]["turns"][0]  # an AR is the reference, not checked
    s = res["summary"]["overall"]
    assert s["eagle2@int8"]["speedup_vs_own_ar"] == pytest.approx(
        s["eagle2@int8"]["tokens_per_s"] / s["ar@int8"]["tokens_per_s"], rel=1e-3)
    assert s["ar@int4"]["speedup_vs_own_ar"] == 1.0 and "speedup_vs_own_ar" not in s["eagle2"]
    # the int8 target really is another model: its answers need not equal fp32's, its own AR is what is compared
    from bench.report import ar_of, base_method, quant_of
    assert (base_method("eagle2@int8"), quant_of("eagle2@int8"), ar_of("eagle2@int8")) == ("eagle2", "int8", "ar@int8")
    for bad in ("ar@int3", "hf@int8", "eagle2@int8@int4"):
        capsys.readouterr()
        assert latency.main(bench_argv(model_dirs, tmp_path / "x.json", "--methods", f"ar,{bad}")) == 1
        assert "--methods: unknown" in capsys.readouterr().err


def test_llamacpp_baseline_checks(model_dirs, tmp_path, capsys, monkeypatch):
    """Method llamacpp: greedy, on the CPU, from a GGUF file, never quantized on load; without llama.cpp installed,
    a one-line error naming the package."""
    import bench.llamacpp_baseline as lcp

    out = tmp_path / "x.json"
    for extra, msg in ((["--methods", "ar,llamacpp@int8"], "--methods: unknown"),
                       (["--methods", "ar,llamacpp", "--temperature", "0.7"], "greedy (--temperature 0)"),
                       (["--methods", "ar,llamacpp"], "pass --gguf")):
        capsys.readouterr()
        assert latency.main(bench_argv(model_dirs, out, *extra)) == 1
        assert msg in capsys.readouterr().err
    monkeypatch.setattr(lcp, "_LIB", None)
    monkeypatch.setattr(lcp, "shared_object", lambda: None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert latency.main(bench_argv(model_dirs, out, "--methods", "ar,llamacpp", "--gguf", str(gguf))) == 1
    assert f"pip install --no-deps {lcp.PACKAGE}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_llamacpp_decodes_the_default_gguf(smollm2_dir, smollm2_gguf):
    """llama.cpp on the GGUF the default checkpoint was converted from computes what our AR computes on it, up to
    its own rounding (its Q4_1 matmuls round activations to 8 bits): next-token logits correlated > 0.995 with
    ours (measured 0.9989), log-probabilities of our 100 likeliest tokens within 0.75 (measured 0.41), the same five
    likeliest tokens, and a timed greedy answer."""
    from bench.llamacpp_baseline import LlamaCpp, shared_object
    from fasteagle.checkpoint import load_target
    from fasteagle.model import causal_mask
    from fasteagle.tokenizer import load_tokenizer

    if shared_object() is None:
        pytest.skip("llama.cpp is an optional bench baseline: pip install --no-deps llama-cpp-cffi==0.3.1")
    tok = load_tokenizer(smollm2_dir)
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    target, _ = load_target(smollm2_dir, max_seq_len=256)
    with torch.no_grad():
        hidden = target(torch.tensor([ids]), torch.arange(len(ids))[None], torch.zeros(1, dtype=torch.long),
                        causal_mask(len(ids)))
        ours = target.logits(hidden[0, -1])
    model = LlamaCpp(smollm2_gguf, 256, 1)
    try:
        theirs = torch.from_numpy(model.next_logits(ids).copy())
        model.reset()
        tokens, seconds = model.generate(ids, 12, eos_ids=(2,))
    finally:
        model.close()
    assert torch.corrcoef(torch.stack([theirs, ours]))[0, 1] > 0.995
    top = ours.topk(100).indices
    assert (theirs.log_softmax(-1) - ours.log_softmax(-1))[top].abs().max() < 0.75
    assert set(theirs.topk(5).indices.tolist()) == set(ours.topk(5).indices.tolist())
    assert tokens[0] == int(theirs.argmax()) and len(tokens) == 12 and seconds > 0


def test_bad_input(model_dirs, tmp_path):
    ckpt, draft, qfile = model_dirs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": "not a list"}\n')
    with pytest.raises(FastEagleError, match="turns must be a non-empty list"):
        load_questions(bad)
    assert latency.main(bench_argv(model_dirs, tmp_path / "x.json", "--methods", "ar,eagle9")) == 1
    assert latency.main(["--checkpoint", str(ckpt), "--questions", str(qfile), "--device", "cpu",
                         "--out", str(tmp_path / "y.json")]) == 1  # eagle methods without --draft


def test_random_weights_tiny_shape(tmp_path):
    shape = json.dumps({"vocab_size": 128, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
                        "intermediate_size": 64, "max_position_embeddings": 512})
    out = tmp_path / "rw.json"
    argv = ["--random-weights", "--shape", shape, "--device", "cpu", "--context-lens", "16,40",
            "--verify-tokens", "1,8", "--reps", "2", "--warmup", "1", "--depth", "3", "--tree-top-k", "4",
            "--total-tokens", "12", "--threads", "1", "--out", str(out)]
    assert latency.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "random-weights" and res["shape"] == "custom"
    assert res["model"]["args"]["dim"] == 32
    ops = {(r["op"], r["context_len"], r["tokens"]) for r in res["results"]}
    for L in (16, 40):
        assert {("ar_step", L, 1), ("verify", L, 1), ("verify", L, 8), ("round_eagle2", L, 12),
                ("draft_tree_eagle2", L, 12), ("round_eagle1", L, 26), ("draft_tree_eagle1", L, 26)} <= ops
    assert all(r["median_ms"] > 0 and r["bandwidth_fraction"] is None for r in res["results"])
    assert set(res["break_even_tau"]["16"]) == {"eagle1", "eagle2"}
    assert "tau" not in json.dumps(res["results"])  # acceptance is not reported with random weights
    assert is_png(out.with_suffix(".png"))


def test_shapes_and_bandwidth():
    name, a = shape_args("llama-3-8b")
    assert (a.dim, a.n_layers, a.n_kv_heads, a.intermediate_size, a.vocab_size) == (4096, 32, 8, 14336, 128256)
    with pytest.raises(FastEagleError, match="unknown shape"):
        shape_args("llama-9")
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert peak_bandwidth("NVIDIA H200") == 4.8e12
    assert peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert peak_bandwidth("NVIDIA GeForce GTX 660") is None
    assert len(PEAK_BANDWIDTH) > 5
    # Llama-2-7B fp16: 2 (K, V) * 32 layers * 32 heads * 128 dims * 2 bytes = 512 KiB per cached token
    assert kv_bytes_per_forward(shape_args("llama-2-7b")[1], 2, 1) == 512 * 1024


def test_bandwidth_accounting():
    """The CUDA-only roofline fields, from hand-made records: AR reads weights + live KV once per token; EAGLE once per
    round (plus the prefill), and its AR-equivalent fraction counts one forward per emitted token."""
    ar = {"turn": 0, "prompt_tokens": 10, "new_tokens": 10, "seconds": 1.0, "accept_lens": [], "rounds": 0,
          "cache_len": None}
    spec = {**ar, "seconds": 0.5, "accept_lens": [3, 3, 2, 1], "rounds": 4, "equal_ar": True}
    recs = [{"question_id": 1, "category": "c", "methods": {"ar": {"turns": [ar]}, "eagle2": {"turns": [spec]}}}]
    ctx = {"peak": 1000.0, "weight_bytes": 90, "kv_bytes_per_slot": 2, "backend": "triton"}
    s = summarize(recs, ["ar", "eagle2"], ctx)["overall"]
    per_forward = 90 + 2 * (10 + 10 / 2)  # live cache: the prompt plus half the answer on average
    assert s["ar"]["bandwidth_fraction"] == pytest.approx(10 * per_forward / 1.0 / 1000, abs=1e-4)
    assert s["eagle2"]["bandwidth_fraction"] == pytest.approx((1 + 4) * per_forward / 0.5 / 1000, abs=1e-4)
    assert s["eagle2"]["ar_equivalent_bandwidth_fraction"] == pytest.approx(10 * per_forward / 0.5 / 1000, abs=1e-4)
    assert s["eagle2"]["speedup_vs_ar"] == pytest.approx(2.0) and s["eagle2"]["tau"] == pytest.approx(2.25)
    # no peak (CPU, or a GPU missing from the table): no roofline numbers
    s = summarize(recs, ["ar", "eagle2"], {**ctx, "peak": None})["overall"]
    assert s["ar"]["bandwidth_fraction"] is None and s["eagle2"]["ar_equivalent_bandwidth_fraction"] is None


def test_random_weights_cache_size_phases_and_draft_vocab(tmp_path, capsys):
    """bench.random_weights: a fixed --max-seq-len (too small: one error line), --phases, and one draft level over
    the full vocabulary and over a draft vocabulary; its own flags do not leak into later runs."""
    from bench import random_weights

    base = ["--shape", "tiny", "--device", "cpu", "--context-lens", "32", "--verify-tokens", "1,4", "--threads", "1",
            "--reps", "1", "--warmup", "0", "--depth", "2", "--tree-top-k", "2", "--total-tokens", "4"]
    assert random_weights.main([*base, "--max-seq-len", "40"]) == 1  # 32 + the 26-token static tree > 40
    assert "error: --max-seq-len 40 is too small" in capsys.readouterr().err
    assert random_weights.main([*base, "--draft-vocab", "999"]) == 1
    assert random_weights.main([*base, "--phases", "ar,bogus"]) == 1
    assert "error: --phases" in capsys.readouterr().err
    out = tmp_path / "rw.json"
    argv = [*base, "--max-seq-len", "256", "--phases", "ar,draft", "--draft-vocab", "32", "--draft-k", "1,2",
            "--out", str(out)]
    assert random_weights.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["params"]["max_seq_len"] == 256 and res["params"]["draft_vocab"] == 32
    rows = {r["op"]: r for r in res["results"]}
    assert set(rows) == {"ar_step", "draft_level_k1", "draft_level_k2", "draft_level_k1_dv", "draft_level_k2_dv"}
    assert rows["draft_level_k2"]["vocab"] == 256 and rows["draft_level_k2_dv"]["vocab"] == 32
    assert rows["ar_step"]["window"] == 128  # the engine's key window at L = 32, not the 256-slot cache
    assert set(res["context_ratio"]["ratios"]) == set(rows)
    assert res["command"] == "python -m bench.random_weights " + " ".join(argv)
    assert random_weights.OPTIONS == random_weights.DEFAULTS
    assert "component table: tiny" in capsys.readouterr().out
    name, a = shape_args("smollm2-1.7b")
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.intermediate_size, a.rope_theta) == \
        (2048, 24, 32, 32, 8192, 130000.0) and a.tie_embeddings


def test_random_weights_quantized_ar_steps(tmp_path):
    """--quantize int8,int4: after the other phases, the AR step of the target quantized to each mode, its bandwidth
    counted over the quantized bytes; a bad mode is one line."""
    from bench import random_weights

    base = ["--shape", "tiny", "--device", "cpu", "--threads", "1", "--context-lens", "16", "--max-seq-len", "128",
            "--reps", "2", "--warmup", "1", "--phases", "ar", "--out", str(tmp_path / "q.json")]
    assert random_weights.main([*base, "--quantize", "int8,int4"]) == 0
    res = json.loads((tmp_path / "q.json").read_text())
    assert [r["op"] for r in res["results"]] == ["ar_step", "ar_step_int8", "ar_step_int4"]
    assert res["params"]["quantize"] == ["int8", "int4"] and all(r["median_ms"] > 0 for r in res["results"])
    assert random_weights.main([*base, "--quantize", "int3"]) == 1


def test_random_weights_interrupted_keeps_rows(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM (gpu_check's timeout) mid-run: the rows timed so far are written, marked incomplete."""
    from bench import random_weights

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(random_weights, "time_verify", interrupt)
    out = tmp_path / "part.json"
    assert random_weights.main(["--shape", "tiny", "--device", "cpu", "--context-lens", "16", "--threads", "1",
                                "--reps", "1", "--warmup", "0", "--phases", "ar,verify", "--out", str(out)]) == 130
    res = json.loads(out.read_text())
    assert "interrupted after 1 rows" in res["incomplete"] and [r["op"] for r in res["results"]] == ["ar_step"]


def test_tensor_parallel_rank_share():
    """'NAME/tpN': one rank's layers under N-way tensor parallelism, the embedding and LM head whole."""
    _, whole = shape_args("llama-3.1-70b")
    name, share = shape_args("llama-3.1-70b/tp8")
    assert name == "llama-3.1-70b/tp8"
    assert (share.n_heads, share.n_kv_heads, share.intermediate_size) == (8, 1, 3584)
    assert (share.dim, share.vocab_size, share.n_layers) == (whole.dim, whole.vocab_size, whole.n_layers)
    with pytest.raises(FastEagleError, match="KV heads"):
        shape_args("llama-3.1-70b/tp16")
