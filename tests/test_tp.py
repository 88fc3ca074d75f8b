"""Tensor parallelism (fasteagle.tp) on CPU: two gloo ranks started with torch.multiprocessing.

A tiny Llama-3-style GQA target (4 heads, 2 KV heads) and a draft head that often agrees with it are written as
checkpoints; each rank loads only its shard of the target. Both ranks must produce the same tokens (a check that
fails if they diverge), equal to one process running the whole model: greedy token for token for AR, EAGLE-2 and the
static tree, and sampling with the same seed (the all-reduce only reorders fp32 sums, far below the sampling
noise's resolution at this size)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from fasteagle.checkpoint import atomic_output_dir, load_target, write_checkpoint
from fasteagle.draft import load_draft, save_draft
from fasteagle.engine import SpecEngine
from fasteagle.errors import FastEagleError
from fasteagle.sampling import SamplingParams
from fasteagle.tp import check, from_env
from tiny import predictable_pair, tiny_args

PROMPTS = [[3, 9, 1, 30, 7], [5] * 11 + [2, 8]]
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95)
N_NEW = 24


def engines(target, head):
    return {"ar": SpecEngine(target),
            "eagle2": SpecEngine(target, head, depth=4, top_k=3, total_tokens=10),
            "static": SpecEngine(target, head, tree="static", static_choices=[[0], [1], [0, 0], [0, 1], [0, 0, 0]])}


def outputs(target, head) -> dict:
    """Every engine's tokens for every prompt, greedy and sampled (seed 5)."""
    out = {}
    for name, engine in engines(target, head).items():
        for i, p in enumerate(PROMPTS):
            out[f"{name}/greedy/{i}"] = engine.generate(p, N_NEW).tokens
            out[f"{name}/sampled/{i}"] = engine.generate(p, N_NEW, SAMPLED, seed=5).tokens
    return out


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(target dir, head dir, another target's dir): the target is 64 wide, so that its layers, not its small
    vocabulary's embedding and LM head (replicated), hold most of its weights."""
    target, head = predictable_pair(0.5, dim=64, vocab=32)
    root = tmp_path_factory.mktemp("tp")
    dirs = []
    for name, model in (("target", target), ("other", predictable_pair(0.5, seed=3, dim=64, vocab=32)[0])):
        with atomic_output_dir(root / name) as tmp:
            write_checkpoint(tmp, {"kind": "target", "model": model.args.to_dict()}, model.state_dict())
        dirs.append(root / name)
    save_draft(head, root / "head")
    return dirs[0], root / "head", dirs[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, job: dict):
    """One rank, set up as under torchrun (tp.from_env), which also leaves the group at exit: a rank that aborts
    while exiting fails the test."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    tp = from_env("cpu")
    result = {}
    try:
        ckpt = job["other"] if rank == 1 and job.get("other") else job["target"]
        try:
            target, _ = load_target(ckpt, max_seq_len=128, tp=tp)
        except FastEagleError as e:
            result["error"] = str(e)
            return
        head = load_draft(job["head"], target)
        result["param_bytes"] = param_bytes(target)
        if job.get("compile"):
            engine = SpecEngine(target, head, depth=3, top_k=2, total_tokens=6, compile=True)
            result["compiled"] = [engine.generate(p, N_NEW).tokens for p in PROMPTS]
            result["compiled_sampled"] = [engine.generate(p, N_NEW, SAMPLED, seed=5).tokens for p in PROMPTS]
        else:
            result["outputs"] = outputs(target, head)
    finally:
        with open(os.path.join(job["out"], f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


def run_ranks(tmp_path, job: dict, world: int = 2) -> list[dict]:
    job = {k: str(v) for k, v in job.items()} | {"out": str(tmp_path)}
    mp.start_processes(worker, args=(world, free_port(), job), nprocs=world, start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def test_tp2_equals_one_process(models, tmp_path):
    target_dir, head_dir, _ = models
    torch.set_num_threads(1)
    target, _ = load_target(target_dir, max_seq_len=128)
    want = outputs(target, load_draft(head_dir, target))
    ranks = run_ranks(tmp_path, {"target": target_dir, "head": head_dir})
    assert ranks[0]["outputs"] == ranks[1]["outputs"], "the ranks diverged"
    assert ranks[0]["outputs"] == want
    assert any(len(set(v)) > 3 for v in want.values())  # real text, not one repeated token
    for r in ranks:  # each rank holds half of every layer; the small embedding and LM head are replicated
        assert 0.5 <= r["param_bytes"] / param_bytes(target) < 0.56


def test_tp2_compiled_equals_eager(models, tmp_path):
    target_dir, head_dir, _ = models
    ranks = run_ranks(tmp_path, {"target": target_dir, "head": head_dir, "compile": True})
    target, _ = load_target(target_dir, max_seq_len=128)
    engine = SpecEngine(target, load_draft(head_dir, target), depth=3, top_k=2, total_tokens=6)
    for r in ranks:
        assert r["compiled"] == [engine.generate(p, N_NEW).tokens for p in PROMPTS]
        assert r["compiled_sampled"] == [engine.generate(p, N_NEW, SAMPLED, seed=5).tokens for p in PROMPTS]


def test_ranks_with_different_checkpoints_fail(models, tmp_path):
    target_dir, head_dir, other = models
    ranks = run_ranks(tmp_path, {"target": target_dir, "head": head_dir, "other": other})
    for r in ranks:
        assert "rank 1 loaded a different checkpoint than rank 0" in r["error"]


@pytest.mark.parametrize("kw, world, what", [({"n_heads": 6, "n_kv_heads": 6}, 4, "attention heads"),
                                             ({"n_heads": 4, "n_kv_heads": 1}, 2, "KV heads"),
                                             ({"n_experts": 4}, 2, "mixture-of-experts")])
def test_unsplittable_targets_are_refused(kw, world, what):
    with pytest.raises(FastEagleError, match=what):
        check(tiny_args(dim=48, **kw), world)


LEAVE = """
import glob, sys, torch, torch.distributed as dist
from fasteagle import tp
def gloo_threads():
    return sum(open(f).read().startswith("pt_gloo") for f in glob.glob("/proc/self/task/*/comm"))
init = dict(rank=0, world_size=1, init_method="tcp://127.0.0.1:" + sys.argv[1])
tp.join("gloo", **init) if sys.argv[2] == "join" else dist.init_process_group("gloo", **init)
assert gloo_threads() > 0, "gloo's worker threads are not named as this test expects"
x, hook = torch.arange(6.0), tp._all_reduce_hook(None)
assert torch.equal(hook(None, None, x) + 0, x)  # one rank: the sum is the input
assert torch.equal(torch.compile(hook)(None, None, x), x)
tp.shutdown()
print(gloo_threads())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="counts threads through Linux's /proc")
def test_leaving_the_group_stops_its_threads():
    """After the layers' all-reduces, eager and compiled, leaving must free the gloo group at once: one still alive at
    interpreter exit aborts the process there (tp.join). A fresh process each, as a rank is; the control, a group
    joined without tp.join, stays alive."""
    def threads_left(how):
        run = subprocess.run([sys.executable, "-c", LEAVE, str(free_port()), how], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        return int(run.stdout.split()[-1])

    assert threads_left("join") == 0
    assert threads_left("plain") > 0  # the control: the test sees a group that outlives shutdown
