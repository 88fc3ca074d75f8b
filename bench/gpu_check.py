"""One command for a lent GPU: every GPU measurement this project needs, into one folder, in about 6 minutes.

    python -m bench.gpu_check --out DIR [--reduced] [--steps NAME,...] [--budget SECONDS]
        [--checkpoint DIR [--draft DIR]] [--questions FILE]

GPU time is lent rarely and briefly, so this is what runs when it is. On a CUDA machine (an H100: under 6 minutes):

    tests           pytest tests/test_gpu_check.py -k cuda, TRITON_INTERPRET unset: the Triton kernels compiled for
                    the device against their PyTorch references, and the compiled engine (CUDA graphs) against plain
                    decoding. (The CPU suite runs the kernels only under the interpreter; CI runs it.)
    model           the default model (SmolLM2-135M-Instruct) into the user cache ($FASTEAGLE_CACHE); skipped with
                    --checkpoint
    latency-auto    bench.latency --compile on the first turns of 20 MT-bench questions, 256 new tokens: AR and
                    EAGLE-2 with the automatic shape (the default model with its bundled head, or --checkpoint/--draft)
    latency-60      the same for EAGLE-2 at the reference's shape: 60 tokens, depth 6, tree top-k 10
    random-weights  the component table (bench.random_weights) at the Llama-3-8B shape, bf16, compiled: AR step,
                    verify(N) for N = 1..64, one draft level with and without a draft vocabulary, at contexts 512 and
                    4,096 in an 8,192-slot cache; then the tree builds and whole rounds while time remains
    quant           the AR step of the Llama-3-8B shape quantized to int8 and to int4 (weight-only, compiled),
                    with the fraction of peak bandwidth over the bytes the quantized forward reads
    kernels         bench/kernels.py --quick: the kernel micro-benchmarks

Reduced mode (automatic without CUDA, or --reduced; 2-3 minutes on 2 CPU cores, and what CI can run): the same
pipeline on the CPU, scaled down. tests and kernels are skipped (they need CUDA), the latency steps answer one
question with 16 new tokens, eagerly, and the component table and the quantized AR steps are timed at the "tiny"
shape.

Every step is a subprocess (`sys.executable -m ...`) with its own timeout: its share of --budget (default 360 s on
CUDA, 200 s reduced) plus whatever the steps before it left unused. On a timeout the step gets SIGTERM, so
bench.latency and bench.random_weights still write what they measured, then SIGKILL. A failing step does not stop the
others. Each step's stdout and stderr go to DIR/<step>.log; DIR/summary.json (rewritten after every step) records per
step its status (ok / failed / skipped) and why, seconds, command, exit status and the files it wrote, plus the
device, torch/triton versions and the git commit. Exit status: 0 when no step failed, 1 when one did, 2 for bad input.
"""
import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "fasteagle-gpu-check/1"
STEPS = ("tests", "model", "latency-auto", "latency-60", "random-weights", "quant", "kernels")
BUDGET = {"cuda": 360.0, "reduced": 200.0}  # seconds for the whole check (the sum of the steps' limits)
GRACE_S = 15.0  # after SIGTERM, how long a step may take to write its partial results


@dataclass
class Step:
    name: str
    argv: list[str] | None  # None: skipped (why says why)
    limit: float  # seconds, at the default budget (scaled with --budget)
    why: str = ""
    needs: str | None = None  # a step whose failure makes this one pointless
    env: dict = field(default_factory=dict)  # extra environment; a None value removes the variable
    result: dict = field(default_factory=dict)


class BadInput(Exception):
    pass


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (created; steps write into it)")
    p.add_argument("--reduced", action="store_true", help="the scaled-down CPU run (automatic without CUDA)")
    p.add_argument("--steps", help=f"only these steps, comma-separated, from {','.join(STEPS)} (default: all)")
    p.add_argument("--budget", type=float, help="seconds for the whole check (default: 360 on CUDA, 200 reduced)")
    p.add_argument("--checkpoint", type=Path, help="target checkpoint for the latency steps (default: the default "
                                                   "model, downloaded into the user cache by the model step)")
    p.add_argument("--draft", type=Path, help="draft head for --checkpoint (default model: its bundled head)")
    p.add_argument("--questions", type=Path, help="question .jsonl (default: bench.latency's, MT-bench in ../shared)")
    return p.parse_args(argv)


def check_args(a) -> list[str] | None:
    """The step names --steps selects (None: all); BadInput for anything that cannot run."""
    if a.steps is None:
        steps = None
    else:
        steps = [s.strip() for s in a.steps.split(",") if s.strip()]
        bad = [s for s in steps if s not in STEPS]
        if bad or not steps:
            raise BadInput(f"--steps: unknown step {bad[0] if bad else '(none given)'!r} (steps: {','.join(STEPS)})")
    if a.out.exists() and not a.out.is_dir():
        raise BadInput(f"--out {a.out}: exists and is not a folder")
    if a.budget is not None and not a.budget > 0:
        raise BadInput("--budget must be a positive number of seconds")
    for flag, path in (("--checkpoint", a.checkpoint), ("--draft", a.draft)):
        if path is not None and not path.is_dir():
            raise BadInput(f"{flag} {path}: not a folder")
    if a.draft is not None and a.checkpoint is None:
        raise BadInput("--draft needs --checkpoint (the default model uses its bundled head)")
    if a.questions is not None and not a.questions.is_file():
        raise BadInput(f"--questions {a.questions}: no such file")
    return steps


# --- the plan ---------------------------------------------------------------------------------------------------------


def py(*args) -> list[str]:
    return [sys.executable, *args]


def plan(a, mode: str, out: Path) -> list[Step]:
    """The steps of a CUDA check (mode "cuda") or of the reduced CPU check ("reduced"), in order."""
    cuda = mode == "cuda"
    steps = [Step("tests", py("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_gpu_check.py",
                              "-k", "cuda"), 40, "the CUDA tests (kernels compiled for the device, CUDA graphs)",
                  env={"TRITON_INTERPRET": None})]
    if not cuda:
        steps[0] = Step("tests", None, 0, "reduced mode: the CUDA tests need a GPU (CI runs the CPU suite)")

    if a.checkpoint is not None:
        steps.append(Step("model", None, 0, "--checkpoint given"))
    else:
        steps.append(Step("model", py("-m", "fasteagle.download", "smollm2"), 25 if cuda else 60,
                          "the default model into the user cache (download + conversion on the first run only)"))
    model = [] if a.checkpoint is None else ["--checkpoint", str(a.checkpoint)]
    model += [] if a.draft is None else ["--draft", str(a.draft)]
    questions = a.questions or _default_questions()
    common = [*model, "--questions", str(questions), "--turns", "1", "--no-progress", "--no-resume"]
    if cuda:
        common += ["--device", "cuda", "--compile", "--limit", "20", "--max-new-tokens", "256"]
    else:
        # one thread: on a shared 2-core machine a second thread mostly waits for a time slice
        common += ["--device", "cpu", "--threads", "1", "--warmup", "0", "--limit", "1", "--max-new-tokens", "16"]
    latency = [
        ("latency-auto", ["--methods", "ar,eagle2"], 85 if cuda else 60, "AR and EAGLE-2, automatic shape"),
        ("latency-60", ["--methods", "eagle2", "--depth", "6", "--tree-top-k", "10", "--total-tokens", "60"],
         50 if cuda else 40, "EAGLE-2 at 60 tokens, depth 6, tree top-k 10"),
    ]
    for name, extra, limit, what in latency:
        if not questions.is_file():
            steps.append(Step(name, None, 0, f"no questions file at {questions} (pass --questions)"))
            continue
        steps.append(Step(name, py("-m", "bench.latency", *common, *extra, "--out", str(out / f"{name}.json")),
                          limit, what, needs="model"))

    if cuda:
        rw = ["--shape", "llama-3-8b", "--device", "cuda", "--dtype", "bfloat16", "--compile",
              "--context-lens", "512,4096", "--max-seq-len", "8192", "--verify-tokens", "1,4,8,16,32,64",
              "--out", str(out / "random-llama-3-8b.json")]
        steps.append(Step("random-weights", py("-m", "bench.random_weights", *rw), 90,
                          "the component table at the Llama-3-8B shape, bf16, compiled"))
        q = ["--shape", "llama-3-8b", "--device", "cuda", "--dtype", "bfloat16", "--compile", "--context-lens", "512",
             "--max-seq-len", "1024", "--phases", "ar", "--quantize", "int8,int4", "--out", str(out / "quant.json")]
        steps.append(Step("quant", py("-m", "bench.random_weights", *q), 40,
                          "the AR step at the Llama-3-8B shape: bf16, int8 and int4 weights, compiled"))
        steps.append(Step("kernels", py("bench/kernels.py", "--quick", "--out", str(out / "kernels.json")), 30,
                          "the kernel micro-benchmarks"))
    else:
        rw = ["--shape", "tiny", "--device", "cpu", "--threads", "1", "--context-lens", "64,512", "--max-seq-len",
              "1024", "--verify-tokens", "1,4,16", "--reps", "2", "--warmup", "1", "--draft-vocab", "64",
              "--out", str(out / "random-tiny.json")]
        steps.append(Step("random-weights", py("-m", "bench.random_weights", *rw), 25,
                          "the component table at the tiny shape"))
        q = ["--shape", "tiny", "--device", "cpu", "--threads", "1", "--context-lens", "64", "--max-seq-len", "256",
             "--phases", "ar", "--quantize", "int8,int4", "--reps", "2", "--warmup", "1", "--out", str(out / "quant.json")]
        steps.append(Step("quant", py("-m", "bench.random_weights", *q), 15,
                          "the AR step at the tiny shape: fp32, int8 and int4 weights"))
        steps.append(Step("kernels", None, 0, "no CUDA: the kernel micro-benchmarks time the Triton kernels on a GPU "
                                              "(tests/test_kernels.py checks them under the interpreter)"))
    return steps


def _default_questions() -> Path:
    """bench.latency's default (MT-bench in the sibling ../shared), else the same under ./shared."""
    from bench.latency import DEFAULT_QUESTIONS

    inside = REPO / DEFAULT_QUESTIONS.relative_to(DEFAULT_QUESTIONS.parents[3])  # shared/data/...
    return DEFAULT_QUESTIONS if DEFAULT_QUESTIONS.is_file() or not inside.is_file() else inside


# --- running ----------------------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


def last_error(log: Path) -> str:
    """The line that says why a step failed: its last `error:` line, else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.lower().startswith(("error", "e   ", "failed"))]
    return (errors or lines or [""])[-1][:300]


def run_step(step: Step, out: Path, timeout: float) -> dict:
    """Run one step's subprocess in the repository root, output into out/<step>.log; -> its summary record."""
    log = out / f"{step.name}.log"
    env = dict(os.environ)
    for k, v in step.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    before = snapshot(out)
    t0 = time.perf_counter()
    timed_out = False
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(step.argv)}\n")
        f.flush()
        proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = _stop(proc)
        except KeyboardInterrupt:
            _stop(proc)
            raise
    seconds = time.perf_counter() - t0
    after = snapshot(out)
    files = sorted(str(p.relative_to(out)) for p, sig in after.items()
                   if before.get(p) != sig and p != log and p.name != "summary.json")
    rec = {"status": "ok" if rc == 0 and not timed_out else "failed", "seconds": round(seconds, 1),
           "timeout_s": round(timeout, 1), "returncode": rc, "log": log.name, "files": files}
    if timed_out:
        rec["why"] = f"timed out after {timeout:.0f}s (stopped; partial results, if any, are in its files)"
    elif rc != 0:
        rec["why"] = f"exit status {rc}: {last_error(log)}"
    return rec


def _stop(proc) -> int:
    """SIGTERM to the step's process group, then SIGKILL after GRACE_S; -> the exit status."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.returncode if proc.returncode is not None else -9


def environment(mode: str) -> dict:
    import torch

    from bench.env import device_info, git_commit, versions

    commit, dirty = git_commit()
    return {"device": device_info("cuda" if mode == "cuda" else "cpu"), "cuda_available": torch.cuda.is_available(),
            "versions": versions(), "commit": commit, "commit_dirty": dirty}


def write_summary(path: Path, summary: dict):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, path)


def run(a, argv) -> int:
    import torch

    selected = check_args(a)
    cuda = torch.cuda.is_available() and not a.reduced
    mode = "cuda" if cuda else "reduced"
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = a.budget or BUDGET[mode]
    steps = plan(a, mode, out)
    scale = budget / BUDGET[mode]
    summary = {"schema": SCHEMA, "mode": mode,
               "why_reduced": None if cuda else ("--reduced" if a.reduced else "no CUDA device"),
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": shlex.join(["python", "-m", "bench.gpu_check", *argv]), "out": str(out),
               "budget_s": budget, **environment(mode), "steps": [], "ok": None, "seconds": None}
    path = out / "summary.json"
    t_start = time.perf_counter()
    status, deadline = {}, 0.0  # each step must end by the sum of the limits so far: time one saves, later ones get
    for step in steps:
        rec = {"name": step.name, "what": step.why if step.argv else None,
               "command": shlex.join(step.argv) if step.argv else None}
        elapsed = time.perf_counter() - t_start
        left = budget - elapsed
        if selected is not None and step.name not in selected:
            rec.update(status="skipped", why="not selected (--steps)")
        elif step.argv is None:
            rec.update(status="skipped", why=step.why)
        elif step.needs and status.get(step.needs) == "failed":
            rec.update(status="skipped", why=f"the {step.needs} step failed")
        elif left < 1:
            rec.update(status="skipped", why=f"the {budget:.0f}s budget is spent")
        else:
            deadline += step.limit * scale
            print(f"[gpu-check] {step.name}: {step.why} ...", file=sys.stderr, flush=True)
            rec.update(run_step(step, out, max(1.0, min(deadline - elapsed, left))))
        status[step.name] = rec["status"]
        summary["steps"].append(rec)
        print(f"[gpu-check] {step.name}: {rec['status']}" + (f" ({rec['seconds']}s)" if "seconds" in rec else "")
              + (f": {rec['why']}" if rec.get("why") else "")
              + (f" -> {', '.join(rec['files'])}" if rec.get("files") else ""), file=sys.stderr, flush=True)
        summary["seconds"] = round(time.perf_counter() - t_start, 1)
        write_summary(path, summary)
    failed = [s["name"] for s in summary["steps"] if s["status"] == "failed"]
    summary["ok"] = not failed
    write_summary(path, summary)
    counts = {k: sum(s["status"] == k for s in summary["steps"]) for k in ("ok", "failed", "skipped")}
    print(f"gpu check ({mode}): {counts['ok']} ok, {counts['failed']} failed"
          + (f" ({', '.join(failed)})" if failed else "") + f", {counts['skipped']} skipped in {summary['seconds']}s; "
          f"{path}")
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    try:
        return run(a, argv)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
