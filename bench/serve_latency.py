"""Server overhead: time to first token and inter-token latency through `python -m fasteagle.serve` (HTTP, SSE,
the official `openai` client) versus the same engine in-process, on the same questions (all in-process first, then all through the server).

  python -m bench.serve_latency [--checkpoint CKPT --draft HEAD] [--questions FILE --limit 10] [--max-tokens 128]

Both sides use the same flags (default: the default model with its bundled head, greedy) and stream the chat
reply. Time to first token: request sent -> first content. Inter-token latency: per request, (last content -
first content) / (completion tokens - 1). Medians over the questions go in bench/results/serve-latency-*.json.
"""
import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.env import RESULTS, device_info, git_commit, slug, versions, write_json_atomic
from fasteagle.questions import load_questions
from fasteagle.errors import FastEagleError

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = "bench"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.serve_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="default: the default model")
    p.add_argument("--draft", type=Path, help="default: the default model's bundled head")
    p.add_argument("--questions", type=Path, default=SHARED / "data" / "mt_bench" / "question.jsonl")
    p.add_argument("--limit", type=int, default=10, help="questions (first turns)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def model_flags(args) -> list[str]:
    flags = ["--threads", str(args.threads), "--device", "cpu"]
    flags += ["--checkpoint", str(args.checkpoint)] if args.checkpoint else []
    return flags + (["--draft", str(args.draft)] if args.draft else [])


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fasteagle.serve", "--port", str(port), "--model-name", MODEL,
                             "--log-level", "warning", *model_flags(args)])
    base = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(1200):
        try:
            with urllib.request.urlopen(base + "/health") as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.25)
        if proc.poll() is not None:
            break
    proc.kill()
    raise FastEagleError("the server did not become healthy")


def timing(t0: float, stamps: list[float], tokens: int) -> dict:
    return {"ttft_s": stamps[0] - t0, "itl_s": (stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 else None,
            "tokens": tokens}


def through_server(client, prompt: str, n: int) -> dict:
    t0, stamps, tokens = time.perf_counter(), [], 0
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return timing(t0, stamps, tokens)


def in_process(engine, tok, eos, prompt: str, n: int) -> dict:
    t0, stamps, tokens = time.perf_counter(), [], 0
    ids = tok.encode_chat([{"role": "user", "content": prompt}])
    decoder = tok.stream()
    for new in engine.stream(ids, n, eos_ids=eos):
        tokens += len(new)
        if "".join(decoder.push(t) for t in new if t not in eos):
            stamps.append(time.perf_counter())
    return timing(t0, stamps, tokens)


def load_in_process(args, max_seq_len: int):
    from fasteagle.checkpoint import read_config
    from fasteagle.generate import auto_shape, load_engine, parse_args as generate_args, resolve_model
    from fasteagle.tokenizer import load_tokenizer

    gargs = generate_args(model_flags(args))
    ckpt, draft_dir, bundled, _ = resolve_model(gargs)
    engine, cfg = load_engine(gargs, ckpt, draft_dir, bundled, auto_shape(gargs), max_seq_len, max_seq_len)
    return engine, load_tokenizer(ckpt, read_config(ckpt, "target")), list(cfg.get("eos_token_ids") or [])


def summary(rows: list[dict]) -> dict:
    itl = [r["itl_s"] for r in rows if r["itl_s"] is not None]
    return {"ttft_median_s": round(statistics.median(r["ttft_s"] for r in rows), 4),
            "itl_median_s": round(statistics.median(itl), 5) if itl else None,
            "tokens": sum(r["tokens"] for r in rows)}


def run(args) -> int:
    import openai
    import torch

    from fasteagle.serve.__main__ import DEFAULT_CACHE

    torch.set_num_threads(args.threads)
    questions = load_questions(args.questions, args.limit, turns=1)
    proc, base = start_server(args)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        engine, tok, eos = load_in_process(args, DEFAULT_CACHE)
        through_server(client, "Hello!", 8), in_process(engine, tok, eos, "Hello!", 8)  # warm both
        rows = {"in_process": [], "server": []}
        # one side at a time: on a few cores, two processes taking turns slow each other (OpenMP threads spin)
        for side in rows:
            for i, q in enumerate(questions):
                rows[side].append(through_server(client, q["turns"][0], args.max_tokens) if side == "server" else
                                  in_process(engine, tok, eos, q["turns"][0], args.max_tokens))
                print(f"[{side} {i + 1}/{len(questions)}] {rows[side][-1]['ttft_s']:.3f}s to the first token",
                      file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(30)
    commit, dirty = git_commit()
    result = {"schema": "fasteagle-bench-serve/1", "command": "python -m bench.serve_latency " + " ".join(
        sys.argv[1:]), "commit": commit, "commit_dirty": dirty, "device": device_info("cpu"), "versions": versions(),
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "questions": str(args.questions), "summary": {k: summary(v) for k, v in rows.items()}, "runs": rows}
    out = args.out or RESULTS / f"serve-latency-{slug((args.checkpoint or Path('smollm2-135m-instruct')).name)}-cpu-" \
                                f"{time.strftime('%Y-%m-%d')}.json"
    write_json_atomic(out, result)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    from fasteagle.cli import run_main

    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
