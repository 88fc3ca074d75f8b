"""python -m fasteagle.train {gen-data, fit, eval, all} -- train an EAGLE-1/2 or EAGLE-3 draft head for a target.

  gen-data  --checkpoint DIR --prompts FILE... --out DATA_DIR [--max-new-tokens 256 --batch-size 32 --limit K]
            [--arch eagle3 [--taps 2,15,27]]
  fit       --checkpoint DIR --data DATA_DIR --out HEAD_DIR [--steps 2000 --lr 5e-4 --resume]
            [--arch eagle3 --draft-vocab-size 16384 --ttt-steps 7]
  eval      --checkpoint DIR --draft HEAD_DIR --questions question.jsonl [--max-new-tokens 256]
            [--depth 6 --tree-top-k 10 --total-tokens 60]
  vocab     --checkpoint DIR --draft HEAD_DIR --out NEW_HEAD_DIR (--data DATA_DIR... | --text FILE...) [--size 16384]
  calibrate --checkpoint DIR --draft HEAD_DIR --prompts FILE... [--limit 48 --max-new-tokens 128]
  all       the three in a row: --checkpoint DIR --prompts FILE... --data DATA_DIR --out HEAD_DIR
            --questions question.jsonl (eval's --max-new-tokens / --limit are --eval-max-new-tokens / --eval-limit)
"""
import argparse
import sys
from pathlib import Path

import torch

from fasteagle.cli import DTYPE_NAMES, add_draft_int8_flag, run_main, torch_dtype
from fasteagle.errors import FastEagleError


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FastEagleError("--device cuda: no CUDA device available")
    return torch.device(name)


def _load_target(args, max_seq_len: int = 16):
    from fasteagle.checkpoint import load_target

    dtype = torch_dtype(args.dtype, "cpu")
    target, cfg = load_target(args.checkpoint, device=_device(args.device), dtype=dtype, max_seq_len=max_seq_len)
    return target, cfg


def cmd_gen_data(args):
    from fasteagle.tokenizer import load_tokenizer
    from fasteagle.train.data import gen_data, load_prompts

    prompts = load_prompts(args.prompts)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    if not prompts:
        raise FastEagleError("no prompts to answer")
    target, cfg = _load_target(args)
    taps = _taps(args, target)
    tok = load_tokenizer(args.checkpoint)
    ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    manifest = gen_data(target, ids, args.out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        eos_ids=tok.eos_ids, max_prompt_tokens=args.max_prompt_tokens, taps=taps,
                        source={"checkpoint": str(args.checkpoint), "prompts": [str(p) for p in args.prompts],
                                "limit": args.limit, "dtype": args.dtype})
    n_ans = sum(s["n_answer_tokens"] for s in manifest["shards"])
    print(f"{args.out}: {sum(len(s['prompt_indices']) for s in manifest['shards'])} answers, {n_ans} answer tokens "
          f"({manifest['n_skipped_long']} prompts over {args.max_prompt_tokens} tokens skipped)")


def _taps(args, target) -> tuple:
    """The target layers EAGLE-3 data taps: --taps, or the reference's low / mid / high layers."""
    if args.arch != "eagle3":
        if args.taps:
            raise FastEagleError("--taps is for --arch eagle3")
        return ()
    from fasteagle.eagle3 import default_taps

    if not args.taps:
        return default_taps(target.args.n_layers)
    try:
        taps = tuple(int(x) for x in args.taps.split(","))
    except ValueError:
        raise FastEagleError(f"--taps {args.taps!r}: expected comma-separated layer indices, e.g. 2,15,27") from None
    if len(taps) < 2 or list(taps) != sorted(set(taps)) or not all(0 <= t <= target.args.n_layers for t in taps):
        raise FastEagleError(f"--taps {args.taps}: two or more distinct layers in increasing order, within "
                             f"0..{target.args.n_layers}")
    return taps


def cmd_fit(args):
    from fasteagle.train.loop import TrainConfig, fit

    target, _ = _load_target(args)
    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, batch_tokens=args.batch_tokens,
                      max_len=args.max_len, val_frac=args.val_frac, ckpt_every=args.ckpt_every,
                      eval_every=args.eval_every, noise=_noise(args), ce_weight=args.ce_weight, ce_vocab=args.ce_vocab,
                      seed=args.seed, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                      save_dtype=args.save_dtype, loss_positions=args.loss_positions, ttt_steps=args.ttt_steps,
                      arch=args.arch, draft_vocab_size=args.draft_vocab_size)
    fit(target, args.data, args.out, cfg, resume=args.resume, state_dir=args.state_dir, stop_at=args.stop_at,
        init=args.init, source={"checkpoint": str(args.checkpoint)})


def _noise(args) -> float:
    return args.noise if args.noise is not None else (0.0 if args.arch == "eagle3" else 0.2)


def cmd_eval(args):
    from fasteagle.draft import load_draft
    from fasteagle.tokenizer import load_tokenizer
    from fasteagle.train.evaluate import evaluate_mt_bench

    tok = load_tokenizer(args.checkpoint)
    target, _ = _load_target(args)
    head = load_draft(args.draft, target, device=target.embed.weight.device, dtype=target.embed.weight.dtype)
    out = Path(args.result) if args.result else Path(args.draft) / "eval_mt_bench.json"
    part = None
    if getattr(args, "part", None):
        try:
            i, n = (int(x) for x in args.part.split("/"))
        except ValueError:
            raise FastEagleError(f"--part {args.part!r}: expected I/N, e.g. 0/2") from None
        part = (i, n)
    evaluate_mt_bench(target, head, tok, args.questions, out, max_new_tokens=args.max_new_tokens, limit=args.limit,
                      depth=args.depth, top_k=args.tree_top_k, total_tokens=args.total_tokens, part=part,
                      ar_cache=args.ar_cache)


def cmd_vocab(args):
    from fasteagle.tokenizer import load_tokenizer
    from fasteagle.train.vocab import counts_from_data, counts_from_text, coverage, draft_vocab, write_head_with_vocab

    if bool(args.data) == bool(args.text):
        raise FastEagleError("vocab: give either --data (gen-data directories) or --text (conversation files)")
    target, cfg = _load_target(args)
    V = target.args.vocab_size
    counts = counts_from_data(args.data, V) if args.data else counts_from_text(args.text, load_tokenizer(args.checkpoint), V)
    vocab = draft_vocab(counts, args.size, always=cfg.get("eos_token_ids") or ())
    cov = coverage(counts, vocab)
    write_head_with_vocab(args.draft, args.out, vocab, {
        "size": args.size, "source": [Path(x).name for x in (args.data or args.text)],
        "counted": "gen-data answers" if args.data else "every conversation turn", "tokens": int(counts.sum()),
        "coverage": round(cov, 4)})
    print(f"{args.out}: draft vocabulary of {args.size} tokens covering {cov:.1%} of {int(counts.sum())} counted tokens")


def cmd_calibrate(args):
    from fasteagle.draft import cpu_fast_paths, load_draft
    from fasteagle.tokenizer import load_tokenizer
    from fasteagle.train.calibrate import calibrate, write_calibration
    from fasteagle.train.data import load_prompts

    tok = load_tokenizer(args.checkpoint)
    texts = load_prompts(args.prompts)[args.skip :]
    prompts = [ids for ids in (tok.encode_chat([{"role": "user", "content": p}]) for p in texts)
               if len(ids) <= args.max_prompt_tokens][: args.limit]
    if not prompts:
        raise FastEagleError("calibrate: no prompts left (check --prompts, --skip and --max-prompt-tokens)")
    target, cfg = _load_target(args, max_seq_len=args.max_prompt_tokens + args.max_new_tokens + 128)
    head = load_draft(args.draft, target, device=target.embed.weight.device, dtype=target.embed.weight.dtype)
    int8 = target.embed.weight.device.type == "cpu" and cpu_fast_paths(target, head, args.draft_int8)
    rows = calibrate(target, head, prompts, args.max_new_tokens, tok.eos_ids, batch_size=args.batch_size)
    write_calibration(args.draft, rows, {"prompts": [Path(x).name for x in args.prompts], "skip": args.skip,
                                         "n_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                                         "draft": "int8 (CPU)" if int8 else str(target.embed.weight.dtype),
                                         "method": "greedy rounds replayed against the target's greedy answers"})
    for r in rows:
        print(f"depth {r['depth']} tree-top-k {r['top_k']} total-tokens {r['total_tokens']}: tau {r['tau']:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fasteagle.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--checkpoint", required=True, help="the target's fasteagle checkpoint directory")
        sp.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
        sp.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                        help="the target's compute dtype (default %(default)s)")
        sp.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    def gen_args(sp):
        sp.add_argument("--prompts", nargs="+", required=True,
                        help="JSON/JSONL conversations (ShareGPT, messages, MT-bench); first user turns are used")
        sp.add_argument("--max-new-tokens", type=int, default=256,
                        help="answer length (0: no answers, keep the prompts' features only)")
        sp.add_argument("--batch-size", type=int, default=32)
        sp.add_argument("--limit", type=int, default=None, help="use only the first K prompts")
        sp.add_argument("--max-prompt-tokens", type=int, default=512, help="skip longer prompts (default %(default)s)")

    def fit_args(sp):
        sp.add_argument("--steps", type=int, default=2000)
        sp.add_argument("--lr", type=float, default=5e-4)
        sp.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then cosine decay to 0")
        sp.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per optimizer step")
        sp.add_argument("--max-len", type=int, default=1024, help="longest training sequence (older context cut)")
        sp.add_argument("--val-frac", type=float, default=0.05, help="held-out share of the sequences")
        sp.add_argument("--ckpt-every", type=int, default=200, help="save the training state every N steps")
        sp.add_argument("--eval-every", type=int, default=500, help="validate every N steps")
        sp.add_argument("--noise", type=float, default=None, help="input features get U(-noise/2, noise/2) noise "
                        "(default 0.2; EAGLE-3: 0, as its reference trains)")
        sp.add_argument("--ce-weight", type=float, default=0.1, help="weight of the soft cross-entropy")
        sp.add_argument("--ce-vocab", choices=["data", "full"], default="data",
                        help="soft CE over the token ids seen in the training data (cheap) or the full vocabulary")
        sp.add_argument("--weight-decay", type=float, default=0.0)
        sp.add_argument("--grad-clip", type=float, default=0.5, help="clip gradient values to +-this (0 = off)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--loss-positions", choices=["answer", "all"], default="answer",
                        help="train on the self-distilled answers only (default) or on every position, prompts "
                             "included (teacher-forced text, e.g. data from gen-data --max-new-tokens 0)")
        sp.add_argument("--ttt-steps", type=int, default=1,
                        help="drafting steps simulated in training: k > 1 also trains the head on its own predicted "
                             "features, k levels deep (training-time test; ~k times the compute; default 1)")
        sp.add_argument("--draft-vocab-size", type=int, default=16384,
                        help="EAGLE-3: the head's vocabulary, the most frequent answer tokens (default %(default)s)")
        sp.add_argument("--save-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the written head's weights (default %(default)s)")
        sp.add_argument("--init", default=None, help="start from this draft head (fine-tuning) instead of random "
                        "weights")
        sp.add_argument("--resume", action="store_true", help="continue from the training state in --state-dir")
        sp.add_argument("--state-dir", default=None, help="training state (default: HEAD_DIR + '.state')")
        sp.add_argument("--stop-at", type=int, default=None, help="save the state and stop after this many steps")

    def arch_args(sp, gen: bool):
        sp.add_argument("--arch", choices=["eagle", "eagle3"], default="eagle",
                        help="head architecture: eagle (EAGLE-1/2, the default) or eagle3 (its data taps target "
                             "layers)")
        if gen:
            sp.add_argument("--taps", default=None, help="EAGLE-3: the target layers whose inputs are the features, "
                            "comma-separated (default: the reference's 2, n_layers // 2, n_layers - 3)")

    def eval_args(sp, draft: bool):
        if draft:
            sp.add_argument("--draft", required=True, help="the draft head directory")
        sp.add_argument("--questions", required=True, help="MT-bench question.jsonl (first turns are used)")
        # in `all`, --max-new-tokens and --limit belong to gen-data: the eval ones get an eval- prefix there
        prefix = "" if draft else "eval-"
        sp.add_argument(f"--{prefix}max-new-tokens", dest=f"{prefix.replace('-', '_')}max_new_tokens", type=int,
                        default=256, help="new tokens per question (default %(default)s)")
        sp.add_argument(f"--{prefix}limit", dest=f"{prefix.replace('-', '_')}limit", type=int, default=None,
                        help="only the first K questions")
        sp.add_argument("--depth", type=int, default=6, help="EAGLE-2 draft levels (default %(default)s)")
        sp.add_argument("--tree-top-k", type=int, default=10,
                        help="EAGLE-2 nodes expanded per level (default %(default)s)")
        sp.add_argument("--total-tokens", type=int, default=60,
                        help="EAGLE-2 verify width, root included (default %(default)s)")
        sp.add_argument("--result", default=None, help="result JSON (default: DRAFT/eval_mt_bench.json)")
        sp.add_argument("--ar-cache", default=None, help="JSONL file of plain greedy outputs, read and extended: "
                        "evaluating several heads of one target runs the AR reference once")
        if draft:
            sp.add_argument("--part", default=None, help="I/N: run only every N-th question from the I-th (parallel "
                            "CPU runs); a final run without --part collects all parts and writes the summary")

    sp = sub.add_parser("gen-data", help="the target answers prompts; tokens + features are written as shards")
    common(sp)
    gen_args(sp)
    arch_args(sp, gen=True)
    sp.add_argument("--out", required=True, help="data directory (resumed if it holds a manifest)")
    sp.set_defaults(fn=cmd_gen_data)

    sp = sub.add_parser("fit", help="train a draft head on generated data")
    common(sp)
    sp.add_argument("--data", required=True, nargs="+", help="one or more data directories from gen-data")
    sp.add_argument("--out", required=True, help="draft head directory (written at the end)")
    fit_args(sp)
    arch_args(sp, gen=False)
    sp.set_defaults(fn=cmd_fit)

    sp = sub.add_parser("eval", help="EAGLE-2 greedy tau on MT-bench first turns (+ check spec == AR)")
    common(sp)
    eval_args(sp, draft=True)
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("vocab", help="give a head a draft vocabulary (its V_d most frequent tokens)")
    common(sp)
    sp.add_argument("--draft", required=True, help="the draft head directory")
    sp.add_argument("--out", required=True, help="the new head directory (written atomically)")
    sp.add_argument("--data", nargs="+", help="gen-data directories: count the target's own answers")
    sp.add_argument("--text", nargs="+", help="JSON/JSONL conversation files: count every turn")
    sp.add_argument("--size", type=int, default=16384, help="draft vocabulary size V_d (default %(default)s)")
    sp.set_defaults(fn=cmd_vocab)

    sp = sub.add_parser("calibrate", help="measure the head's greedy tau per tree shape (for the shape chooser)")
    common(sp)
    sp.add_argument("--draft", required=True, help="the draft head directory (calibration.json is written there)")
    sp.add_argument("--prompts", nargs="+", required=True, help="held-out conversation files (first user turns)")
    sp.add_argument("--skip", type=int, default=8, help="skip the first K prompts (default %(default)s)")
    sp.add_argument("--limit", type=int, default=48, help="prompts to use (default %(default)s)")
    sp.add_argument("--max-new-tokens", type=int, default=128, help="per prompt (default %(default)s)")
    sp.add_argument("--max-prompt-tokens", type=int, default=256, help="skip longer prompts (default %(default)s)")
    sp.add_argument("--batch-size", type=int, default=16, help="prompts answered at once (default %(default)s)")
    add_draft_int8_flag(sp)
    sp.set_defaults(fn=cmd_calibrate)

    sp = sub.add_parser("all", help="gen-data, fit and eval in a row")
    common(sp)
    gen_args(sp)
    sp.add_argument("--data", required=True)
    sp.add_argument("--out", required=True, help="draft head directory")
    fit_args(sp)
    arch_args(sp, gen=True)
    eval_args(sp, draft=False)
    sp.set_defaults(fn=None)

    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_main(args.fn or cmd_all, args)


def cmd_all(args):
    data_out, head_out = args.data, args.out
    args.out = data_out
    cmd_gen_data(args)
    args.out = head_out
    cmd_fit(args)
    args.draft, args.max_new_tokens, args.limit = head_out, args.eval_max_new_tokens, args.eval_limit
    cmd_eval(args)


if __name__ == "__main__":
    sys.exit(main())
