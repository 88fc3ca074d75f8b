"""Mean accepted length tau of a draft head: EAGLE-2 greedy decoding vs plain greedy decoding, question by question.

tau = tokens emitted per speculative round (accepted drafts + the target's bonus token), pooled over all rounds of
all questions (sum of emitted tokens / number of rounds, as the EAGLE papers report it); the per-question mean of
taus is stored too. Every question also checks losslessness: the speculative tokens must equal plain greedy's.
Per-question results are appended to RESULT.partial.jsonl as they finish, so a long CPU run resumes where it
stopped; the summary JSON (overall and per category) is written at the end.
"""
import hashlib
import itertools
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from fasteagle.engine import SpecEngine
from fasteagle.errors import FastEagleError
from fasteagle.questions import load_questions


def cache_size(n_prompt: int, max_new_tokens: int, depth: int, total_tokens: int) -> int:
    """One KV cache size for both AR and EAGLE-2 on a prompt: room for a full tree at the very end. It does not
    depend on the tree unless the tree is large, so cached AR outputs stay valid across tree settings."""
    return n_prompt + max_new_tokens + max(128, total_tokens + depth + 8)


def run_ar(target, prompt_ids, max_new_tokens, eos_ids, max_seq_len) -> dict:
    target.setup_cache(max_seq_len)
    ar = SpecEngine(target).generate(prompt_ids, max_new_tokens, eos_ids=eos_ids)
    return {"tokens": ar.tokens, "seconds": round(ar.seconds, 3)}


def run_question(target, head, prompt_ids, ar: dict, max_new_tokens, eos_ids, depth, top_k, total_tokens,
                 max_seq_len) -> dict:
    """EAGLE-2 greedy on one prompt, compared with its plain greedy output `ar` (from run_ar, same cache size)."""
    target.setup_cache(max_seq_len)
    spec = SpecEngine(target, head, tree="dynamic", depth=depth, top_k=top_k, total_tokens=total_tokens).generate(
        prompt_ids, max_new_tokens, eos_ids=eos_ids)
    return {"prompt_tokens": len(prompt_ids), "new_tokens": len(spec.tokens), "ar_tokens": len(ar["tokens"]),
            "equal": spec.tokens == ar["tokens"], "emitted": sum(spec.accept_lens), "rounds": len(spec.accept_lens),
            "tau": spec.mean_accepted, "ar_seconds": ar["seconds"], "spec_seconds": round(spec.seconds, 3),
            "stop_reason": spec.stop_reason}


def fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's weights (which head, which target a cached result belongs to)."""
    h = hashlib.sha256()
    for t in module.state_dict().values():
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _read_jsonl(paths) -> list[dict]:
    out = []
    for path in paths:
        if path is None or not Path(path).exists():
            continue
        for line in Path(path).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: that question runs again
                continue
    return out


def _append_jsonl(path, obj):
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")


def summarize(results: list[dict]) -> dict:
    def pool(rs):
        rounds = sum(r["rounds"] for r in rs)
        taus = [r["tau"] for r in rs if r["tau"] is not None]
        return {"n": len(rs), "tau": sum(r["emitted"] for r in rs) / rounds if rounds else None,
                "tau_mean_of_questions": sum(taus) / len(taus) if taus else None,
                "all_equal": all(r["equal"] for r in rs), "n_equal": sum(r["equal"] for r in rs),
                "new_tokens": sum(r["new_tokens"] for r in rs),
                "ar_seconds": round(sum(r["ar_seconds"] for r in rs), 2),
                "spec_seconds": round(sum(r["spec_seconds"] for r in rs), 2)}

    cats = defaultdict(list)
    for r in results:
        cats[r.get("category", "?")].append(r)
    return {**pool(results), "per_category": {c: pool(rs) for c, rs in sorted(cats.items())}}


@torch.no_grad()
def evaluate_prompts(target, head, items: list[dict], *, max_new_tokens: int = 256, eos_ids=(), depth: int = 6,
                     top_k: int = 10, total_tokens: int = 60, partial_path=None, resume_from=(), ar_cache=None,
                     progress: bool = True) -> list[dict]:
    """items: [{"question_id", "category", "ids"}]. Returns one result dict per item. Finished results are
    appended to partial_path; results already in partial_path or the resume_from files (same settings) are reused.
    ar_cache: a JSONL file of plain greedy outputs (per target, prompt, length and cache size), read and extended,
    so that evaluating several heads of one target runs the AR reference once. head=None: only the AR outputs
    (filling ar_cache ahead of time); each result is then {"question_id", "ar_tokens", "ar_seconds"}."""
    dtype = str(target.embed.weight.dtype)
    settings = {"max_new_tokens": max_new_tokens, "eos_ids": sorted(eos_ids), "depth": depth, "top_k": top_k,
                "total_tokens": total_tokens, "dtype": dtype, "head": fingerprint(head) if head is not None else None}
    done = {r["question_id"]: r for r in _read_jsonl([*resume_from, partial_path])
            if r.get("settings") == settings and head is not None}
    ar_done = {}
    if ar_cache is not None:
        target_id = fingerprint(target)
        ar_done = {r["key"]: r for r in _read_jsonl([ar_cache]) if r.get("target") == target_id}
    results = []
    bar = tqdm(items, desc="eval", unit="q", disable=not progress, dynamic_ncols=True)
    for it in bar:
        if it["question_id"] in done:
            results.append(done[it["question_id"]])
            continue
        S = cache_size(len(it["ids"]), max_new_tokens, depth, total_tokens)
        key = hashlib.sha256(json.dumps([it["ids"], max_new_tokens, sorted(eos_ids), dtype, S]).encode()).hexdigest()
        ar = ar_done.get(key)
        if ar is None:
            ar = run_ar(target, it["ids"], max_new_tokens, eos_ids, S)
            if ar_cache is not None:
                _append_jsonl(ar_cache, {"key": key, "target": target_id, **ar})
        if head is None:
            results.append({"question_id": it["question_id"], "ar_tokens": ar["tokens"], "ar_seconds": ar["seconds"]})
            continue
        r = {"question_id": it["question_id"], "category": it.get("category", "?"),
             **run_question(target, head, it["ids"], ar, max_new_tokens, eos_ids, depth, top_k, total_tokens, S),
             "settings": settings}
        results.append(r)
        _append_jsonl(partial_path, r)
        s = summarize(results)
        bar.set_postfix(tau=f"{s['tau']:.3f}" if s["tau"] else "-", equal=f"{s['n_equal']}/{s['n']}")
    return results


def evaluate_mt_bench(target, head, tokenizer, questions_path, out_path, *, max_new_tokens: int = 256,
                      limit: int | None = None, depth: int = 6, top_k: int = 10, total_tokens: int = 60,
                      part: tuple[int, int] | None = None, ar_cache=None) -> dict | None:
    """EAGLE-2 greedy on the first turns of an MT-bench question file; writes and returns the summary.
    part=(i, n): run only questions i, i+n, i+2n, ... into their own partial file and write no summary (several
    processes share a slow CPU run); a later call without part reuses every part's results."""
    out_path = Path(out_path)
    qs = load_questions(questions_path, limit, turns=1)
    # run categories round-robin, so an unfinished (resumable) run already covers every category evenly
    by_cat = defaultdict(list)
    for q in qs:
        by_cat[q["category"]].append(q)
    qs = [q for rnd in itertools.zip_longest(*by_cat.values()) for q in rnd if q is not None]
    if part is not None:
        i, n = part
        if not 0 <= i < n:
            raise FastEagleError(f"--part {i}/{n}: need 0 <= i < n")
        qs = qs[i::n]
    items = [{**q, "ids": tokenizer.encode_chat([{"role": "user", "content": q["turns"][0]}])} for q in qs]
    stem = out_path.name + ".partial"
    partial = out_path.with_name(f"{stem}-{part[0]}of{part[1]}.jsonl" if part else f"{stem}.jsonl")
    others = sorted(out_path.parent.glob(f"{stem}*.jsonl"))
    try:
        results = evaluate_prompts(target, head, items, max_new_tokens=max_new_tokens, eos_ids=tokenizer.eos_ids,
                                   depth=depth, top_k=top_k, total_tokens=total_tokens, partial_path=partial,
                                   resume_from=[p for p in others if p != partial], ar_cache=ar_cache)
    except KeyboardInterrupt as e:  # the CLI prints this as its one line
        raise type(e)(f"finished questions are kept in {partial}; rerun the same command to resume") from None
    if part is not None:
        s = summarize(results)
        print(f"part {part[0]}/{part[1]}: {s['n']} questions, tau {s['tau']}, spec == AR on {s['n_equal']}")
        return None
    summary = {"questions": str(questions_path), "first_turns": len(results),
               "settings": {"tree": "dynamic (EAGLE-2)", "greedy": True, "max_new_tokens": max_new_tokens,
                            "depth": depth, "top_k": top_k, "total_tokens": total_tokens,
                            "dtype": str(target.embed.weight.dtype), "device": str(target.embed.weight.device)},
               **summarize(results),
               "per_question": sorted(({k: r[k] for k in ("question_id", "category", "tau", "equal", "new_tokens",
                                                           "rounds")} for r in results), key=lambda r: r["question_id"])}
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out_path)
    for p in set(others) | {partial}:
        p.unlink(missing_ok=True)
    print(format_table(summary))
    print(f"wrote {out_path}")
    return summary


def format_table(summary: dict) -> str:
    lines = [f"{'category':<12} {'n':>3} {'tau':>6} {'spec==AR':>9}"]
    for c, s in summary["per_category"].items():
        lines.append(f"{c:<12} {s['n']:>3} {s['tau'] or 0:>6.3f} {s['n_equal']:>5}/{s['n']:<3}")
    lines.append(f"{'all':<12} {summary['n']:>3} {summary['tau'] or 0:>6.3f} {summary['n_equal']:>5}/{summary['n']:<3}")
    return "\n".join(lines)
