"""bench/gpu_check.py, and the CUDA tests it runs on a GPU.

On CPU (CI): the reduced check's summary (ok / failed / skipped with why, exit status, files, logs) with the real
random-weights step at the tiny shape plus stubbed steps that fail and time out; the CUDA plan's commands; bad
input. Nothing is downloaded.

test_cuda_*: only on a CUDA device, and only with the kernels compiled for it (TRITON_INTERPRET unset, this file
alone: `python -m pytest tests/test_gpu_check.py -k cuda`, which `python -m bench.gpu_check` runs);
tests/test_kernels.py checks the same kernels under the Triton interpreter on CPU."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench` is not installed

from bench import gpu_check  # noqa: E402
from bench.gpu_check import Step, py  # noqa: E402


def read_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_reduced_check_summary(tmp_path, monkeypatch, capsys):
    """The real random-weights step (tiny shape) plus a step that fails and one that times out: each recorded with
    its status, why, log and files; the failure does not stop the steps after it; exit status 1."""
    real_plan = gpu_check.plan

    def plan(a, mode, out):
        steps = {s.name: s for s in real_plan(a, mode, out)}
        assert mode == "reduced" and steps["tests"].argv is None and steps["kernels"].argv is None
        fail = Step("stub-fail", py("-c", "import sys; print('error: stubbed failure', file=sys.stderr); "
                                          "sys.exit(3)"), 20, "a stub that fails")
        hang = Step("stub-timeout", py("-c", "import time; time.sleep(60)"), 1.0, "a stub that hangs")
        return [steps["tests"], hang, fail, steps["random-weights"], steps["kernels"]]

    monkeypatch.setattr(gpu_check, "plan", plan)
    monkeypatch.setattr(gpu_check, "GRACE_S", 2.0)
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out), "--reduced"]) == 1
    s = read_summary(out)
    assert s["schema"] == gpu_check.SCHEMA and s["mode"] == "reduced" and s["why_reduced"] == "--reduced"
    assert s["ok"] is False and s["versions"]["torch"] == torch.__version__ and "commit" in s
    assert s["device"]["type"] == "cpu" and s["budget_s"] == gpu_check.BUDGET["reduced"]
    steps = {r["name"]: r for r in s["steps"]}
    assert [r["name"] for r in s["steps"]] == ["tests", "stub-timeout", "stub-fail", "random-weights", "kernels"]
    assert steps["tests"]["status"] == "skipped" and "CUDA" in steps["tests"]["why"]
    assert steps["kernels"]["status"] == "skipped" and "CUDA" in steps["kernels"]["why"]
    f = steps["stub-fail"]
    assert f["status"] == "failed" and f["returncode"] == 3 and "error: stubbed failure" in f["why"]
    assert "stubbed failure" in (out / f["log"]).read_text()
    h = steps["stub-timeout"]
    assert h["status"] == "failed" and "timed out" in h["why"] and h["seconds"] < 15
    rw = steps["random-weights"]
    assert rw["status"] == "ok" and rw["returncode"] == 0, (out / "random-weights.log").read_text()[-2000:]
    assert set(rw["files"]) == {"random-tiny.json", "random-tiny.png"} and rw["seconds"] > 0
    res = json.loads((out / "random-tiny.json").read_text())
    assert res["shape"] == "tiny" and res["params"]["max_seq_len"] == 1024 and res["params"]["draft_vocab"] == 64
    assert {"ar_step", "verify N=16", "draft_level_k4", "draft_level_k4_dv"} <= set(res["context_ratio"]["ratios"])
    assert res["command"].startswith("python -m bench.random_weights")
    err = capsys.readouterr()
    assert "1 ok, 2 failed (stub-timeout, stub-fail), 2 skipped" in err.out


def test_steps_selection_and_dependencies(tmp_path, monkeypatch):
    """--steps runs only the named steps; a step whose prerequisite failed is skipped, saying so."""
    def plan(a, mode, out):
        return [Step("model", py("-c", "raise SystemExit(1)"), 20, "a failing model step"),
                Step("latency-auto", py("-c", "pass"), 20, "needs the model", needs="model"),
                Step("latency-60", py("-c", "pass"), 20, "not selected")]

    monkeypatch.setattr(gpu_check, "plan", plan)
    out = tmp_path / "deps"
    assert gpu_check.main(["--out", str(out), "--reduced", "--steps", "model,latency-auto"]) == 1
    steps = {r["name"]: r for r in read_summary(out)["steps"]}
    assert steps["model"]["status"] == "failed"
    assert steps["latency-auto"] == {**steps["latency-auto"], "status": "skipped", "why": "the model step failed"}
    assert steps["latency-60"]["status"] == "skipped" and "not selected" in steps["latency-60"]["why"]


def test_plans(tmp_path):
    """The CUDA plan's commands (nothing runs) and the reduced plan's scaled-down ones."""
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "turns": ["hi"]}\n')
    a = gpu_check.parse_args(["--out", str(tmp_path), "--questions", str(q)])
    cuda = {s.name: s for s in gpu_check.plan(a, "cuda", tmp_path)}
    assert list(cuda) == list(gpu_check.STEPS)
    assert sum(s.limit for s in cuda.values()) <= gpu_check.BUDGET["cuda"]  # the steps fit the 6 minutes
    assert "TRITON_INTERPRET" in cuda["tests"].env and cuda["tests"].env["TRITON_INTERPRET"] is None
    auto, sixty = " ".join(cuda["latency-auto"].argv), " ".join(cuda["latency-60"].argv)
    for cmd in (auto, sixty):
        assert "--compile" in cmd and "--device cuda" in cmd and "--limit 20" in cmd and "--max-new-tokens 256" in cmd
        assert str(tmp_path) in cmd and "--checkpoint" not in cmd
    assert "--methods ar,eagle2" in auto and "--depth" not in auto  # the automatic shape
    assert "--methods eagle2 --depth 6 --tree-top-k 10 --total-tokens 60" in sixty
    rw = " ".join(cuda["random-weights"].argv)
    assert "--shape llama-3-8b" in rw and "--dtype bfloat16" in rw and "--compile" in rw
    assert "--context-lens 512,4096 --max-seq-len 8192 --verify-tokens 1,4,8,16,32,64" in rw
    assert cuda["kernels"].argv[1:] == ["bench/kernels.py", "--quick", "--out", str(tmp_path / "kernels.json")]
    quant = " ".join(cuda["quant"].argv)
    assert "--shape llama-3-8b" in quant and "--dtype bfloat16" in quant and "--quantize int8,int4" in quant
    assert "--phases ar" in quant and "--compile" in quant
    reduced = {s.name: s for s in gpu_check.plan(a, "reduced", tmp_path)}
    assert sum(s.limit for s in reduced.values()) <= gpu_check.BUDGET["reduced"]
    assert reduced["tests"].argv is None and reduced["kernels"].argv is None
    assert "--shape tiny" in " ".join(reduced["quant"].argv) and "--quantize" in reduced["quant"].argv
    assert "--limit 1" in " ".join(reduced["latency-auto"].argv) and "--compile" not in reduced["latency-auto"].argv
    # pass-through of a checkpoint: no model step; no questions file: the latency steps say why they are skipped
    a = gpu_check.parse_args(["--out", str(tmp_path), "--checkpoint", str(tmp_path), "--questions", str(q)])
    steps = {s.name: s for s in gpu_check.plan(a, "cuda", tmp_path)}
    assert steps["model"].argv is None and "--checkpoint" in steps["latency-auto"].argv
    a = gpu_check.parse_args(["--out", str(tmp_path)])
    a.questions = tmp_path / "absent.jsonl"
    steps = {s.name: s for s in gpu_check.plan(a, "cuda", tmp_path)}
    assert steps["latency-auto"].argv is None and "--questions" in steps["latency-auto"].why


def test_bad_input(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--steps", "tests,nope"]) == 2
    assert "error: --steps: unknown step 'nope'" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert gpu_check.main(["--out", str(tmp_path / "file")]) == 2
    assert gpu_check.main(["--out", str(tmp_path / "x"), "--draft", str(tmp_path)]) == 2
    assert "--draft needs --checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- on a GPU ------------------------------------------------------------------------------------------------------


def need_compiled_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (python -m bench.gpu_check runs these on a GPU)")
    from fasteagle.kernels import _common

    if _common.INTERPRET:
        pytest.skip("the kernels were loaded under TRITON_INTERPRET=1 (tests/test_kernels.py in the same run): "
                    "run `python -m pytest tests/test_gpu_check.py -k cuda` alone")


def tree_block_mask(T: int, W: int, gen) -> torch.Tensor:
    """[T, W]: the last T nodes of a random W-node tree, each seeing its ancestors and itself."""
    mask = torch.zeros(W, W, dtype=torch.bool)
    for i in range(W):
        mask[i, i] = True
        if i:
            mask[i] |= mask[int(torch.randint(0, i, (1,), generator=gen))]
    return mask[W - T:]


@torch.no_grad()
def test_cuda_kernels_match_references():
    need_compiled_kernels()
    from fasteagle.kernels.draft_ops import (fused_embed_fc, fused_embed_fc_reference, lm_head_topk,
                                             lm_head_topk_reference)
    from fasteagle.kernels.kv_commit import kv_commit, kv_commit_reference
    from fasteagle.kernels.tree_attention import tree_attention, tree_attention_reference

    dev, gen = torch.device("cuda"), torch.Generator().manual_seed(0)
    tol = {torch.float32: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
           torch.float16: dict(atol=1e-2, rtol=1e-2)}
    # tree attention: decode, the 60-token verify at Llama-3-8B heads, a draft level (W > T), a long MHA cache
    for T, W, L, Hq, Hkv, D, dtype in [(1, 1, 1000, 32, 8, 128, torch.bfloat16),
                                       (60, 60, 777, 32, 8, 128, torch.bfloat16),
                                       (10, 30, 300, 9, 3, 64, torch.float32),
                                       (16, 16, 4096, 8, 8, 64, torch.float16)]:
        S = L + W + 13
        q = torch.randn(1, Hq, T, D, generator=gen).to(dev, dtype)
        k, v = (torch.randn(1, Hkv, S, D, generator=gen).to(dev, dtype) for _ in range(2))
        k[:, :, L + W:], v[:, :, L + W:] = float("nan"), float("nan")  # beyond the block: must not be read
        cache_len, mask = torch.tensor([L], device=dev), tree_block_mask(T, W, gen).to(dev)
        out = tree_attention(q, k, v, cache_len, mask)
        ref = tree_attention_reference(q.float(), k.float(), v.float(), cache_len, mask)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.float(), ref, **tol[dtype], msg=f"tree_attention T={T} W={W} L={L}")
    # LM head + top-k: Llama-3's vocabulary in bf16 (the returned ids carry the returned values), fp32 exactly
    h, w = torch.randn(10, 4096, generator=gen).to(dev, torch.bfloat16), None
    w = (torch.randn(128256, 4096, generator=gen) / 64).to(dev, torch.bfloat16)
    vals, ids = lm_head_topk(h, w, 10)
    ref_vals, _ = lm_head_topk_reference(h, w, 10)
    torch.testing.assert_close(vals, ref_vals, atol=2e-2, rtol=2e-2)
    logp = torch.log_softmax(h.float() @ w.float().T, -1)
    torch.testing.assert_close(logp.gather(1, ids), vals, atol=2e-2, rtol=2e-2)
    h32, w32 = torch.randn(5, 64, generator=gen).to(dev), torch.randn(4099, 64, generator=gen).to(dev)
    vals, ids = lm_head_topk(h32, w32, 8, 0.7)
    ref_vals, ref_ids = lm_head_topk_reference(h32, w32, 8, 0.7)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(vals, ref_vals, atol=1e-4, rtol=1e-4)
    # fused embedding + fc of the draft head
    emb, fc = torch.randn(4099, 64, generator=gen).to(dev), torch.randn(64, 128, generator=gen).to(dev)
    bias, tokens = torch.randn(64, generator=gen).to(dev), torch.randint(0, 4099, (13,), generator=gen).to(dev)
    feats = torch.randn(13, 64, generator=gen).to(dev)
    torch.testing.assert_close(fused_embed_fc(tokens, feats, emb, fc, bias),
                               fused_embed_fc_reference(tokens, feats, emb, fc, bias), atol=1e-3, rtol=1e-3)
    # KV commit of an accepted path
    k, v = (torch.randn(1, 8, 2048, 128, generator=gen).to(dev, torch.bfloat16) for _ in range(2))
    k_ref, v_ref = k.clone(), v.clone()
    cache_len, path = torch.tensor([1000], device=dev), torch.tensor([0, 1, 3, 7, 12, 20, 33], device=dev)
    kv_commit(k, v, cache_len, path)
    kv_commit_reference(k_ref, v_ref, cache_len, path)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@torch.no_grad()
def test_cuda_compiled_engine_equals_plain_decoding():
    """EAGLE-2 and EAGLE-1 compiled with CUDA graphs (reduce-overhead), the triton backend, produce plain greedy
    decoding's tokens; the drafts are accepted."""
    need_compiled_kernels()
    from fasteagle.engine import SpecEngine
    from tiny import predictable_pair

    target, head = predictable_pair(2.0, vocab=320, dim=128, max_seq_len=256)
    target = target.cuda()
    target.setup_cache(256, attn_backend="triton")
    head = head.cuda().bind(target)
    ar = SpecEngine(target)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2]]
    for tree in ("dynamic", "static"):
        spec = SpecEngine(target, head, tree=tree, depth=4, top_k=4, total_tokens=16, compile=True)
        lens = []
        for prompt in prompts:
            ref = ar.generate(prompt, 40)
            out = spec.generate(prompt, 40)
            assert out.tokens == ref.tokens, (tree, prompt)
            lens += out.accept_lens
        assert sum(lens) > len(lens), tree  # drafts were accepted
