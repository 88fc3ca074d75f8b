"""Batch-1 latency: plain AR vs EAGLE-1 (static tree) vs EAGLE-2 (dynamic tree) on a question set, or one step of
each engine phase at real model sizes with random weights.

    python -m bench.latency --checkpoint DIR --draft DIR --questions question.jsonl \\
        [--methods ar,eagle1,eagle2[,eagle3,hf,llamacpp]] [--draft3 DIR] [--max-new-tokens 1024] [--temperature 0] [--warmup 1] [--compile]
    python -m bench.latency --random-weights --shape llama-3-8b [--context-lens 512,2048] [--verify-tokens 1,16,60]

Questions (MT-bench / Spec-Bench format: question_id, category, turns) run turn by turn, each method answering the
later turns with its own previous answers in the context, as MT-bench does. Methods run one after another on each
question, so every question's AR baseline is measured next to its EAGLE runs. Per method and question-turn: new
tokens, wall time (prefill included; CUDA-synchronised), tokens/s, mean accepted length tau and every round's
accepted length. Greedy runs check losslessness as they go: each EAGLE answer must equal the AR answer token for
token; any mismatch is listed in the summary, printed loudly, and makes the exit status 3.

Summaries per method, overall and per category: tokens/s (total tokens / total time), speedup over AR from the same
run, tau (emitted tokens / speculative rounds, pooled over all rounds), the accepted-length distribution and, on
CUDA only, the memory bandwidth achieved by the target's forwards as a fraction of the device's peak.

Results go to one JSON file (device, versions, commit, every parameter, per-question records, summaries) and a PNG
plot beside it. Each finished question is also appended to OUT.partial.jsonl: rerunning the same command (same
settings) skips the questions already done, so a long run can be interrupted and resumed.

`hf` is the optional baseline: Hugging Face transformers `generate` on the same weights (when installed).
`llamacpp` is the optional CPU baseline: llama.cpp decoding a GGUF file (--gguf; default: the default model's own,
which its checkpoint was converted from), greedy only (bench/llamacpp_baseline.py says how to install it).
With --random-weights the acceptance is meaningless and is not reported; instead each phase is timed alone
(AR step, verify forward of N tokens, draft tree build, a whole speculative round), and break_even_tau =
round time / AR step time says how many tokens a round must emit to beat AR at that size.
"""
import argparse
import hashlib
import json
import os
import sys
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import torch

from bench.env import BENCH, default_out, device_info, header, sync, write_json_atomic
from bench.report import (TREES, ar_of, base_method, format_summary, lossless_report, plot_questions, quant_of,
                          summarize)
from fasteagle.cli import (add_compile_flags, add_device_flags, add_draft_int8_flag, apply_compile_flags, interrupted,
                           sigterm_as_interrupt, torch_dtype)
from fasteagle.errors import FastEagleError
from fasteagle.questions import load_questions
from fasteagle.tp import from_rank0

DEFAULT_QUESTIONS = BENCH.parents[1] / "shared" / "data" / "mt_bench" / "question.jsonl"
from fasteagle.download import DEFAULT_HEAD, DEFAULT_HEAD3  # noqa: E402
from fasteagle.engine import DEFAULT_DEPTH, DEFAULT_TOP_K, DEFAULT_TOTAL_TOKENS  # noqa: E402
METHODS = ("ar", "eagle1", "eagle2", "eagle3", "hf", "llamacpp")
EXTERNAL = ("hf", "llamacpp")  # baselines run by other programs: no engine, no quantization on load
AUTO = ("eagle2", "eagle3")  # the dynamic-tree methods, whose shape is chosen automatically unless given
QUANT = ("int8", "int4")  # a method on a target quantized on load: METHOD@int8, METHOD@int4 (fasteagle.quant)
MISMATCH_EXIT = 3


def parse_args(argv=None):
    from fasteagle.engine import DEFAULT_DEPTH, DEFAULT_TOP_K, DEFAULT_TOTAL_TOKENS

    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="converted target checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--draft", type=Path, help="EAGLE-1/2 draft head for eagle1 / eagle2 (default model: its bundled "
                                              "head)")
    p.add_argument("--draft3", type=Path, help="EAGLE-3 draft head for eagle3 (default model: its bundled EAGLE-3 "
                                               "head, when there is one)")
    p.add_argument("--gguf", type=Path, help="the GGUF file method llamacpp decodes (default model: its GGUF)")
    p.add_argument("--questions", type=Path, help=f"question .jsonl (default: {DEFAULT_QUESTIONS})")
    p.add_argument("--methods", default="ar,eagle1,eagle2",
                   help=f"comma-separated, from {', '.join(METHODS)}; METHOD@int8 / METHOD@int4 runs it on the "
                        f"target quantized on load (e.g. ar,eagle2,ar@int8,eagle2@int8): each quantization's EAGLE "
                        f"answers are checked against its own AR's")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--stride", type=int, default=1, help="every K-th question (all categories, fewer questions)")
    p.add_argument("--turns", type=int, help="at most this many turns per question (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="per turn")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (and the losslessness check)")
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling nucleus mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (each question's seed derives from it)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed generations per method before timing (random weights: calls per phase)")
    add_compile_flags(p, "the engine")
    add_device_flags(p)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--max-seq-len", type=int,
                   help="fixed KV cache size. Default: on CPU without --compile, a cache just big enough for each "
                        "turn (the CPU attention reads the whole static cache); otherwise the model's context, "
                        "at most 4096")
    p.add_argument("--out", type=Path, help="result JSON (default: bench/results/latency-MODEL-DEVICE-DATE.json; "
                                            "pass it explicitly to resume on a later day); the plot is written "
                                            "beside it as .png")
    p.add_argument("--no-resume", action="store_true", help="ignore (and delete) a partial results file")
    p.add_argument("--save-text", action="store_true", help="store every answer's text in the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = p.add_argument_group("speculative decoding")
    d.add_argument("--depth", type=int, help=f"EAGLE-2 draft levels (default: chosen automatically; {DEFAULT_DEPTH} "
                                              f"if another shape flag is given)")
    d.add_argument("--tree-top-k", type=int, help=f"EAGLE-2 nodes expanded per level (default: automatic; "
                                                  f"{DEFAULT_TOP_K})")
    d.add_argument("--total-tokens", type=int, help=f"EAGLE-2 verify width, root included (default: automatic; "
                                                    f"{DEFAULT_TOTAL_TOKENS})")
    d.add_argument("--draft-temperature", type=float, default=1.0)
    add_draft_int8_flag(d)
    r = p.add_argument_group("random weights")
    r.add_argument("--random-weights", action="store_true", help="time the engine's phases at a model shape")
    r.add_argument("--shape", default="llama-2-7b", help="preset (see bench/shapes.py) or a JSON object of "
                                                         "ModelArgs fields")
    r.add_argument("--context-lens", default="512,2048", help="committed cache lengths to measure at")
    r.add_argument("--verify-tokens", default="1,16,32,64", help="verify widths N to time")
    r.add_argument("--reps", type=int, default=20, help="timed calls per phase (the median is reported)")
    p.add_argument("--replot", type=Path, metavar="RESULT.json", help="only redraw the plot of a result file")
    return p.parse_args(argv)


# --- running the methods -----------------------------------------------------------------------------------------


class Runner:
    """Holds the loaded models and runs every method on one question at a time."""

    def __init__(self, args, methods: list[str], tp=None):
        """tp: this rank's fasteagle.tp.TP under tensor parallelism."""
        from fasteagle.checkpoint import load_target, read_config
        from fasteagle.draft import load_draft
        from fasteagle.sampling import SamplingParams
        from fasteagle.tokenizer import load_tokenizer
        from fasteagle.tree import MC_SIM_7B_63, StaticTreeShape, dynamic_tree_size

        self.args, self.methods = args, methods
        self.params = SamplingParams(args.temperature, args.top_k, args.top_p)
        self.device = args.device
        self.dtype = torch_dtype(args.dtype, args.device)
        self.backend = "triton" if args.device == "cuda" else "sdpa"
        cfg = read_config(args.checkpoint, "target")
        self.model_max = cfg["model"]["max_position_embeddings"]
        # cache policy: "fit" sizes the cache per turn (the SDPA path reads the whole static cache, so a smaller one
        # is faster); compiled graphs and CUDA graphs need one fixed size
        self.fit = args.max_seq_len is None and args.device == "cpu" and not args.compile
        self.max_seq_len = args.max_seq_len or min(self.model_max, 4096)
        # one target per quantization the methods ask for (None: the checkpoint as stored)
        self.targets = {}
        for q in dict.fromkeys(quant_of(m) for m in methods):
            self.targets[q], self.cfg = load_target(args.checkpoint, self.device, self.dtype,
                                                    64 if self.fit else self.max_seq_len, self.backend,
                                                    quantize=q, tp=tp)
        self.target = self.targets.get(None) or next(iter(self.targets.values()))  # sizes and shapes for the report
        self.tok = load_tokenizer(args.checkpoint, self.cfg)
        self.eos = list(self.cfg.get("eos_token_ids") or [])
        # one head per EAGLE method: each engine sets up (and compiled graphs capture) its own draft cache
        self.heads = {m: load_draft(head_dir(args, m), self.target_of(m), self.device, self.dtype) for m in methods
                      if base_method(m) in TREES}
        if any(h.arch != "eagle3" for m, h in self.heads.items() if base_method(m) == "eagle3"):
            raise FastEagleError(f"--draft3 {args.draft3}: not an EAGLE-3 head")
        self.tree_sizes = {}
        for m in (m for m in methods if base_method(m) == "eagle1"):
            self.tree_sizes[m] = StaticTreeShape.from_choices(MC_SIM_7B_63).size
        self.policies, self.choices = {}, {}  # per dynamic-tree method: its adaptive shapes and the chooser's table
        self.draft_level = {}  # per dynamic-tree method: the measured cost of one draft level
        self.auto = args.auto_shape and any(base_method(m) in AUTO for m in methods)
        depth = args.depth
        for m in (m for m in methods if base_method(m) in AUTO):
            self.tree_sizes[m] = dynamic_tree_size(args.depth, args.tree_top_k, args.total_tokens)
            if self.auto:
                depth = max(depth, self._choose_shape(m))
        # enough cache past the answer for a whole tree plus the draft's path, so no run falls back to AR at the end
        self.headroom = max(self.tree_sizes.values(), default=1) + depth + 8
        self.engines = {}
        if not self.fit:
            self.engines = {m: self._engine(m) for m in methods if m not in EXTERNAL}
        self.hf = self.llamacpp = None
        if "hf" in methods:
            from bench.hf_baseline import build_hf_model

            self.hf = build_hf_model(self.target)
        if "llamacpp" in methods:
            from bench.llamacpp_baseline import LlamaCpp

            self.llamacpp = LlamaCpp(args.gguf, self.model_max, torch.get_num_threads())

    def _choose_shape(self, method) -> int:
        """A dynamic-tree method's automatic shape: the chooser's best few shapes, switched per round
        (fasteagle.autotune). Returns the deepest shape's depth."""
        from fasteagle.autotune import auto_policy

        policy, choice, costs = auto_policy(self.target_of(method), self.heads[method], head_dir(self.args, method),
                                            self.args.compile, draft_int8=self.args.draft_int8)
        self.policies[method], self.choices[method] = policy, choice
        self.draft_level[method] = costs.get("draft") or {}  # seconds of one draft level by rows it expands
        print(f"[{method} shape: {describe_choice(choice)}]", file=sys.stderr)
        if policy is None:
            return 0
        self.tree_sizes[method] = max(s.total_tokens for s in policy.shapes)
        return max(s.depth for s in policy.shapes)

    def _engine(self, method):
        from fasteagle.engine import SpecEngine

        a = self.args
        head, policy = self.heads.get(method), self.policies.get(method)
        if base_method(method) in AUTO and self.auto and policy is None:
            head = None  # the chooser found no shape faster than AR here: the method runs as plain decoding
        return SpecEngine(self.target_of(method), head, tree=TREES.get(base_method(method), "dynamic"), depth=a.depth,
                          top_k=a.tree_top_k, total_tokens=a.total_tokens, draft_temperature=a.draft_temperature,
                          compile=a.compile, policy=policy, draft_int8=a.draft_int8)

    def engine(self, method, prompt_len):
        if not self.fit:
            return self.engines[method]
        n = prompt_len + self.args.max_new_tokens + self.headroom
        target = self.target_of(method)
        if target.max_seq_len != n:
            target.setup_cache(n, attn_backend=self.backend)
        return self._engine(method)  # cheap: sets up the draft cache for this size

    def target_of(self, method):
        return self.targets[quant_of(method)]

    def generate(self, method, ids, seed):
        """-> (tokens, seconds, accept_lens, stop_reason, cache size used or None)"""
        n_new = self.args.max_new_tokens
        if method == "hf":
            from bench.hf_baseline import hf_generate

            tokens, seconds = hf_generate(self.hf, ids, n_new, self.eos, self.params, seed)
            stop = "eos" if tokens and tokens[-1] in self.eos else "max_new_tokens"
            return tokens, seconds, [], stop, None
        if method == "llamacpp":
            tokens, seconds = self.llamacpp.generate(ids, n_new, self.eos)
            return tokens, seconds, [], "eos" if tokens[-1] in self.eos else "max_new_tokens", None
        engine = self.engine(method, len(ids))
        sync(self.device)
        r = engine.generate(ids, n_new, self.params, seed=seed, eos_ids=self.eos)  # synchronises before timing ends
        return r.tokens, r.seconds, r.accept_lens, r.stop_reason, self.target_of(method).max_seq_len

    def warmup(self, questions):
        """Untimed runs: args.warmup generations per method on the first prompt; with --compile, also one prefill
        per prompt-length bucket the run can reach, so that no compilation lands inside a timed generation."""
        ids = self.tok.encode_chat([{"role": "user", "content": questions[0]["turns"][0]}])
        n = min(self.args.max_new_tokens, 64)
        for m in self.methods:
            for _ in range(self.args.warmup):
                if m == "hf":
                    from bench.hf_baseline import hf_generate

                    hf_generate(self.hf, ids, n, self.eos, self.params, 0)
                elif m == "llamacpp":
                    self.llamacpp.generate(ids, n, self.eos)
                else:
                    self.engine(m, len(ids)).generate(ids, n, self.params, seed=0, eos_ids=self.eos)
        if self.args.compile:
            longest = max(len(self.tok.encode_chat([{"role": "user", "content": "\n".join(q["turns"])}]))
                          + (len(q["turns"]) - 1) * (self.args.max_new_tokens + 16) for q in questions)
            limit = self.max_seq_len - self.headroom
            reach = min(longest + self.args.max_new_tokens, limit)  # the longest context a timed turn reaches
            for m, eng in self.engines.items():
                b = 16
                while b <= min(longest * 2, limit):  # a prompt of exactly b tokens compiles bucket b
                    eng.generate([ids[0]] * b, 2, self.params, seed=0)
                    b *= 2
                # every key window (decode step, each round shape) up to that context
                eng.warmup(ids, max(1, reach - len(ids)), self.params)

    def run_question(self, q) -> dict:
        seed = (zlib.crc32(str(q["question_id"]).encode()) + self.args.seed) & 0x7FFFFFFF
        rec = {"question_id": q["question_id"], "category": q["category"], "methods": {}}
        outputs = {}
        for m in self.methods:
            messages, turns, outs = [], [], []
            for i, text in enumerate(q["turns"]):
                messages.append({"role": "user", "content": text})
                ids = self.tok.encode_chat(messages)
                tokens, seconds, accept_lens, stop, cache = self.generate(m, ids, seed + i)
                answer = self.tok.decode([t for t in tokens if t not in self.eos])
                messages.append({"role": "assistant", "content": answer})
                n = len(tokens)
                entry = {"turn": i, "prompt_tokens": len(ids), "new_tokens": n, "seconds": round(seconds, 5),
                         "tokens_per_s": round(n / seconds, 3) if seconds > 0 else None,
                         "tau": round(sum(accept_lens) / len(accept_lens), 4) if accept_lens else None,
                         "rounds": len(accept_lens), "accept_lens": accept_lens, "stop_reason": stop,
                         "cache_len": cache}
                if self.args.save_text:
                    entry["text"] = answer
                turns.append(entry)
                outs.append(tokens)
            rec["methods"][m] = {"turns": turns}
            outputs[m] = outs
        # greedy losslessness: every method's answer must equal AR's on the same target, turn by turn ("hf" is
        # another implementation: its agreement is recorded but does not count towards the verdict)
        if self.params.greedy:
            for m, outs in outputs.items():
                if base_method(m) == "ar" or ar_of(m) not in outputs:
                    continue
                for entry, mine, ref in zip(rec["methods"][m]["turns"], outs, outputs[ar_of(m)]):
                    entry["equal_ar"] = mine == ref
                    if mine != ref:
                        entry["first_difference"] = next(
                            (i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), min(len(mine), len(ref)))
        return rec


def head_dir(args, method):
    """The draft head directory a speculative method uses."""
    return args.draft3 if base_method(method) == "eagle3" else args.draft


def describe_choice(choice) -> str:
    if choice.shape is None:
        return "plain AR (no calibrated shape is predicted to beat it on this machine)"
    return f"{choice.shape}, predicted {choice.speedup:.2f}x AR"


def choice_json(choice, policy, draft_level: dict | None = None) -> dict | None:
    """The automatic shape in the results: the chooser's table and the shapes the run switched between."""
    if choice is None:
        return None
    row = lambda r: {"depth": r[0].depth, "top_k": r[0].top_k, "total_tokens": r[0].total_tokens, "tau": r[1],
                     "round_cost_ar_steps": round(r[2], 3), "predicted_speedup": round(r[3], 3)}
    return {"chosen": None if choice.shape is None else row(choice.table[0]),
            "draft_level_ms": {str(m): round(1000 * t, 3) for m, t in (draft_level or {}).items()},
            "adaptive_set": [row(r) for s in policy.shapes for r in choice.table if r[0] == s] if policy else [],
            "table": [row(r) for r in choice.table]}


# --- resuming ----------------------------------------------------------------------------------------------------


def _identity(path) -> dict | None:
    """A checkpoint directory's (its weights file's) or a file's path, size and modification time."""
    if path is None:
        return None
    w = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    st = w.stat() if w.is_file() else None
    return {"path": str(Path(path).resolve()), "bytes": st.st_size if st else None,
            "mtime_ns": st.st_mtime_ns if st else None}


def settings_of(args, runner) -> dict:
    """Everything that changes outputs or timings: records are reused only under equal settings."""
    return {"checkpoint": _identity(args.checkpoint), "draft": _identity(args.draft),
            **({"draft3": _identity(args.draft3)} if args.draft3 else {}), "device": args.device,
            "device_name": device_info(args.device)["name"], "dtype": str(runner.dtype).replace("torch.", ""),
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "seed": args.seed, "compile": args.compile,
            "cpp_wrapper": args.cpp_wrapper, "turns": args.turns, "stride": args.stride,
            "cache": "fit" if runner.fit else runner.max_seq_len, "depth": args.depth,
            "tree_top_k": args.tree_top_k, "total_tokens": args.total_tokens, "auto_shape": runner.auto,
            "draft_temperature": args.draft_temperature, "threads": torch.get_num_threads(),
            **({"gguf": _identity(args.gguf), "llamacpp": runner.llamacpp.system_info} if args.gguf else {})}


def draft_info(path) -> dict | None:
    """Which head produced the numbers: its weights' sha256 and what its config says about its origin."""
    if path is None:
        return None
    cfg = json.loads((Path(path) / "config.json").read_text())
    training = {k: v for k, v in (cfg.get("training") or {}).items() if k != "val_history"}
    digest = hashlib.sha256((Path(path) / "model.safetensors").read_bytes()).hexdigest()
    return {"sha256": digest, "source": cfg.get("source"), "training": training or None}


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def load_done(paths, key: str, methods) -> dict:
    """Finished question records (same settings, every requested method present) from earlier runs."""
    done = {}
    for path in paths:
        if not path.is_file():
            continue
        if path.suffix == ".jsonl":
            recs = []
            for line in path.read_text().splitlines():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: that question runs again
                    continue
        else:
            try:
                res = json.loads(path.read_text())
            except (json.JSONDecodeError, OSError):
                continue
            recs = res.get("records", []) if res.get("settings_key") == key else []
            recs = [{**r, "settings_key": key} for r in recs]
        for r in recs:
            if r.get("settings_key") == key and all(m in r.get("methods", {}) for m in methods):
                done[json.dumps(r["question_id"])] = {**r, "methods": {m: r["methods"][m] for m in methods}}
    return done


# --- the question benchmark ----------------------------------------------------------------------------------------


def run_questions(args) -> int:
    from tqdm import tqdm

    from bench.shapes import kv_bytes_per_forward, weight_bytes_per_forward

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if base_method(m) not in METHODS or m.count("@") > 1
           or (quant_of(m) is not None and (quant_of(m) not in QUANT or base_method(m) in EXTERNAL))]
    if bad or not methods:
        raise FastEagleError(f"--methods: unknown {bad or methods} (choose from {', '.join(METHODS)}, each but "
                             f"{' and '.join(EXTERNAL)} optionally @{' / @'.join(QUANT)})")
    if len(set(methods)) != len(methods):
        raise FastEagleError("--methods lists a method twice")
    if args.max_new_tokens < 1:
        raise FastEagleError("--max-new-tokens must be >= 1")
    if args.warmup < 0 or (args.limit is not None and args.limit < 1) or (args.turns is not None and args.turns < 1):
        raise FastEagleError("--warmup must be >= 0, --limit and --turns >= 1")
    bases = {base_method(m) for m in methods}
    if args.checkpoint is None:
        from fasteagle.download import ensure_smollm2

        args.checkpoint = ensure_smollm2()
        if args.draft is None and DEFAULT_HEAD.is_dir():
            args.draft = DEFAULT_HEAD
        if args.draft3 is None and "eagle3" in bases and DEFAULT_HEAD3.is_dir():
            args.draft3 = DEFAULT_HEAD3
    if bases & {"eagle1", "eagle2"} and args.draft is None:
        raise FastEagleError("methods eagle1/eagle2 need a draft head: pass --draft (or --methods ar)")
    if "eagle3" in bases and args.draft3 is None:
        raise FastEagleError("method eagle3 needs an EAGLE-3 head: pass --draft3 (the default model has none "
                             "bundled yet)")
    if "eagle3" not in bases:
        args.draft3 = None  # not used: kept out of the settings
    check_llamacpp(args, methods)
    questions_path = args.questions or DEFAULT_QUESTIONS
    if args.stride < 1:
        raise FastEagleError("--stride must be >= 1")
    questions = load_questions(questions_path, None, args.turns)[:: args.stride][: args.limit]
    if args.threads:
        torch.set_num_threads(args.threads)

    tp = tensor_parallel(args, methods)
    args.tensor_parallel = tp.world if tp else 1  # recorded with the parameters
    rank0 = tp is None or tp.rank == 0
    runner = Runner(args, methods, tp)
    settings = settings_of(args, runner)
    key = settings_key(settings)
    model_name = Path(args.checkpoint).resolve().name
    out = args.out or default_out(args, model_name, "")
    partial = out.with_name(out.stem + ".partial.jsonl")
    if args.no_resume:
        partial.unlink(missing_ok=True)
        done = {}
    else:
        done = from_rank0(load_done([out, partial], key, methods) if rank0 else None, tp)
    todo = [q for q in questions if json.dumps(q["question_id"]) not in done]
    if done:
        print(f"[resume] {len(questions) - len(todo)} of {len(questions)} questions already done with these settings "
              f"({partial.name}); running {len(todo)}", file=sys.stderr)
    records = {json.dumps(q["question_id"]): done[json.dumps(q["question_id"])]
               for q in questions if json.dumps(q["question_id"]) in done}
    totals = defaultdict(lambda: [0, 0.0, 0, 0, 0])  # tokens, seconds, emitted, rounds, mismatching turns
    try:
        if todo and (args.warmup or args.compile):
            t0 = time.perf_counter()
            runner.warmup(questions)
            print(f"[warm-up: {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
        bar = tqdm(todo, desc="bench", unit="q", disable=args.no_progress, dynamic_ncols=True)
        for q in bar:
            rec = runner.run_question(q)
            rec["settings_key"] = key
            if rank0:
                with open(partial, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            records[json.dumps(q["question_id"])] = rec
            for m, v in rec["methods"].items():
                t = totals[m]
                for e in v["turns"]:
                    t[0] += e["new_tokens"]
                    t[1] += e["seconds"]
                    t[2] += sum(e["accept_lens"])
                    t[3] += e["rounds"]
                    t[4] += e.get("equal_ar") is False
            bar.set_postfix_str(" ".join(
                f"{m}:{t[0] / t[1]:.1f}t/s" + (f",τ{t[2] / t[3]:.2f}" if t[3] else "") + (f",MISMATCH{t[4]}" if t[4]
                                                                                          else "")
                for m, t in totals.items()))
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(records)} questions saved in {partial}; rerun the same command to resume",
              file=sys.stderr)
        return 130

    if not rank0:  # tensor parallelism: the other ranks only computed along
        return 0
    recs = [records[json.dumps(q["question_id"])] for q in questions]
    for r in recs:
        r.pop("settings_key", None)
    el = runner.target.embed.weight.element_size()
    ctx = {"peak": device_info(args.device)["peak_bandwidth_bytes_per_s"] if args.device == "cuda" else None,
           "weight_bytes": weight_bytes_per_forward(runner.target), "backend": runner.backend,
           "kv_bytes_per_slot": kv_bytes_per_forward(runner.target.args, el, 1)}
    res = header(args, "questions")
    res["params"].update({"methods": methods, "dtype": settings["dtype"], "attn_backend": runner.backend,
                          "cache": "fit per turn" if runner.fit else runner.max_seq_len,
                          "tree_sizes": runner.tree_sizes, "checkpoint": str(args.checkpoint),
                          **{f"{m}_shape": choice_json(runner.choices[m], runner.policies[m], runner.draft_level[m])
                             for m in runner.choices},
                          "draft": str(args.draft) if args.draft else None,
                          **({"draft3": str(args.draft3)} if args.draft3 else {}),
                          **({"llamacpp_build": runner.llamacpp.system_info} if runner.llamacpp else {})})
    res["settings_key"] = key
    res["model"] = {"name": model_name, "checkpoint": str(args.checkpoint), "draft": str(args.draft) if args.draft
                    else None, "args": runner.target.args.to_dict(), "weight_bytes_per_forward": ctx["weight_bytes"],
                    "target_source": runner.cfg.get("source"), "draft_info": draft_info(args.draft),
                    **({"draft3_info": draft_info(args.draft3)} if args.draft3 else {})}
    res["questions"] = {"file": str(questions_path), "n": len(recs),
                        "turns": sum(len(r["methods"][methods[0]]["turns"]) for r in recs),
                        "categories": dict(sorted(Counter(r["category"] for r in recs).items()))}
    res["lossless"] = lossless_report(recs, methods, runner.params.greedy)
    res["summary"] = summarize(recs, methods, ctx)
    res["notes"] = [
        "tokens_per_s = total new tokens / total wall time (prefill included); speedup_vs_ar compares tokens/s "
        "measured in the same run",
        "tau = tokens emitted per speculative round (accepted drafts + the bonus token), pooled over all rounds",
        "bandwidth_fraction (CUDA only) = (weights + KV bytes read by the target's forwards) / time / peak; "
        "ar_equivalent_bandwidth_fraction counts one forward per token, so > 1 means faster than AR's roofline",
    ] + (["CPU timings show relative cost on this machine only; they are not performance claims"]
         if args.device == "cpu" else [])
    res["records"] = recs
    png = out.with_suffix(".png")
    res["plot"] = png.name
    write_json_atomic(out, res)
    plot_questions(res, png)
    partial.unlink(missing_ok=True)
    print(format_summary(res))
    print(f"wrote {out} and {png}", file=sys.stderr)
    if res["lossless"]["checked"] and not res["lossless"]["ok"]:
        print(f"error: losslessness check failed ({len(res['lossless']['mismatches'])} mismatching turns)",
              file=sys.stderr)
        return MISMATCH_EXIT
    return 0


def replot(path: Path) -> int:
    from bench.report import plot_random

    try:
        res = json.loads(path.read_text())
        mode = res["mode"]
    except (OSError, ValueError, KeyError) as e:
        raise FastEagleError(f"{path}: not a bench.latency result file ({e})") from None
    png = path.with_suffix(".png")
    (plot_random if mode == "random-weights" else plot_questions)(res, png)
    print(f"wrote {png}", file=sys.stderr)
    return 0


# --- entry point ---------------------------------------------------------------------------------------------------


def check_llamacpp(args, methods):
    """Method llamacpp: greedy, on the CPU, from a GGUF file (the default model's when none is given)."""
    if "llamacpp" not in methods:
        args.gguf = None  # not used: kept out of the settings
        return
    if args.device != "cpu" or args.temperature > 0:
        raise FastEagleError("method llamacpp runs greedy (--temperature 0) on the CPU only")
    if args.gguf is None:
        from fasteagle.download import default_checkpoint, fetch_smollm2_gguf

        if Path(args.checkpoint).resolve() != Path(default_checkpoint()).resolve():
            raise FastEagleError("method llamacpp: pass --gguf, the GGUF file --checkpoint was converted from")
        args.gguf = fetch_smollm2_gguf()


def tensor_parallel(args, methods):
    """Under torchrun (WORLD_SIZE > 1): join the process group (fasteagle.tp); every rank runs every question, rank 0
    alone prints and writes the results."""
    from fasteagle.tp import from_env

    tp = from_env(args.device)
    if tp is not None and set(EXTERNAL) & set(methods):
        raise FastEagleError("the hf and llamacpp baselines do not run under tensor parallelism; leave them out of "
                             "--methods")
    if tp is not None and tp.rank != 0:
        args.no_progress = True
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return tp


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    args.auto_shape = args.depth is None and args.tree_top_k is None and args.total_tokens is None
    for name, default in (("depth", DEFAULT_DEPTH), ("tree_top_k", DEFAULT_TOP_K), ("total_tokens", DEFAULT_TOTAL_TOKENS)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    try:
        with sigterm_as_interrupt():  # SIGTERM: like Ctrl-C, so that temporary files are removed
            return _main(args)
    except KeyboardInterrupt as e:  # outside the question loop (download, conversion, random weights)
        return interrupted(e)


def _main(args) -> int:
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise FastEagleError("--device cuda: no CUDA device available")
        apply_compile_flags(args)
        if args.compile:
            for knob in ("recompile_limit", "cache_size_limit"):  # one prefill graph per prompt-length bucket
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        if args.replot:
            return replot(args.replot)
        if args.random_weights:
            from bench.random_weights import run_random

            return run_random(args)
        return run_questions(args)
    except FastEagleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
