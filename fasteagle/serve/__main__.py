"""python -m fasteagle.serve: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one speculative engine.

With no --checkpoint it serves the default model, SmolLM2-135M-Instruct, with its bundled head, as `generate` runs
it. The model loads (and with --compile, compiles and warms up) in the engine thread after the server starts:
GET /health answers 503 until then, 200 after. Requests run one at a time, first in first out; when --max-queue
requests are already waiting, a new one gets 429.

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "stream": true}'
"""
import argparse
import logging
import os
import sys
from pathlib import Path

from fasteagle.cli import add_compile_flags, add_device_flags
from fasteagle.errors import FastEagleError
from fasteagle.generate import (add_draft_flags, auto_shape, check_machine_flags, default_threads, load_engine,
                                resolve_model, tree_width)

DEFAULT_CACHE = 4096  # KV cache positions when --max-seq-len is not given (within the model's context)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fasteagle.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="converted target checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint directory's name)")
    p.add_argument("--api-key", default=os.environ.get("FASTEAGLE_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $FASTEAGLE_API_KEY; unset: open)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for the engine before 429s")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take, queueing included")
    p.add_argument("--max-seq-len", type=int, help=f"KV cache positions: prompt + reply (default: the model's "
                                                   f"context, at most {DEFAULT_CACHE})")
    add_device_flags(p)
    add_compile_flags(p)
    p.add_argument("--threads", type=int, default=default_threads(), help="CPU threads for torch")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_draft_flags(p)
    p.set_defaults(chat=None)  # resolve_model's: chat applies per endpoint here
    return p.parse_args(argv)


def warm_prompt(tok) -> list[int]:
    try:
        return tok.encode_chat([{"role": "user", "content": "Hello!"}])
    except FastEagleError:  # no chat template
        return tok.encode("Hello!") or [0]


def loader(args, ckpt, draft_dir, bundled, auto, max_seq_len):
    """The worker's load and warm-up steps (run on its thread: CUDA graphs belong to the thread that records them)."""
    from fasteagle.checkpoint import read_config
    from fasteagle.sampling import SamplingParams
    from fasteagle.serve.worker import Loaded
    from fasteagle.tokenizer import load_tokenizer

    def load() -> Loaded:
        engine, cfg = load_engine(args, ckpt, draft_dir, bundled, auto, max_seq_len, max_seq_len)
        tok = load_tokenizer(ckpt, read_config(ckpt, "target"))
        return Loaded(engine, tok, list(cfg.get("eos_token_ids") or []), max_seq_len)

    def warmup(m: Loaded):
        ids = warm_prompt(m.tok)
        kinds = [SamplingParams()] + ([SamplingParams(1.0), SamplingParams(1.0, 0, 0.9)] if args.compile else [])
        for params in kinds:  # greedy, and OpenAI's default (T=1) with and without top-p
            m.engine.warmup(ids, max_seq_len - len(ids) if args.compile else 8, params)

    return load, warmup


def run(args):
    import uvicorn

    from fasteagle.checkpoint import read_config
    from fasteagle.serve.app import create_app
    from fasteagle.serve.worker import Worker

    if args.max_queue < 1:
        raise FastEagleError(f"--max-queue must be >= 1, got {args.max_queue}")
    if not args.request_timeout > 0:
        raise FastEagleError(f"--request-timeout must be > 0, got {args.request_timeout}")
    check_machine_flags(args)
    ckpt, draft_dir, bundled, _ = resolve_model(args)
    auto = auto_shape(args)
    cfg = read_config(ckpt, "target")
    width = tree_width(args, cfg["model"]["vocab_size"]) if draft_dir else None
    max_seq_len = args.max_seq_len or min(cfg["model"]["max_position_embeddings"], DEFAULT_CACHE)
    if width and width + 1 > max_seq_len:
        raise FastEagleError(f"--max-seq-len {max_seq_len} is too small for a {width}-token verify tree")
    name = args.model_name or Path(ckpt).name
    load, warmup = loader(args, ckpt, draft_dir, bundled, auto, max_seq_len)
    worker = Worker(load, args.max_queue, warmup)
    worker.start()
    app = create_app(worker, name, args.api_key, args.request_timeout)
    print(f"[serve: {name} on http://{args.host}:{args.port}/v1; GET /health is 200 once the model is loaded]",
          file=sys.stderr, flush=True)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    worker.stop()


def main(argv=None) -> int:
    from fasteagle.cli import run_main

    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
