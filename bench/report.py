"""Summaries (per method, overall and per category), the losslessness verdict, the console table and the plots."""
from collections import Counter, defaultdict
from pathlib import Path

TREES = {"eagle1": "static", "eagle2": "dynamic", "eagle3": "dynamic"}  # the speculative methods; EAGLE-1 = the reference's default tree


def base_method(m: str) -> str:
    """A method's decoding, without its quantization: eagle2@int8 -> eagle2."""
    return m.split("@")[0]


def quant_of(m: str) -> str | None:
    """The quantization a method's target is loaded with (None: as stored): eagle2@int8 -> int8."""
    return m.split("@")[1] if "@" in m else None


def ar_of(m: str) -> str:
    """The AR method a method's answers are checked against: plain AR on the same target (eagle2@int8 -> ar@int8)."""
    return "ar" + (f"@{quant_of(m)}" if quant_of(m) else "")


def speculative(m: str) -> bool:
    return base_method(m) in TREES


def _pool(entries: list[dict], method: str, ctx: dict) -> dict:
    """Aggregate one method's question-turn entries."""
    tokens = sum(e["new_tokens"] for e in entries)
    seconds = sum(e["seconds"] for e in entries)
    lens = [n for e in entries for n in e["accept_lens"]]
    out = {"turns": len(entries), "new_tokens": tokens, "seconds": round(seconds, 4),
           "tokens_per_s": round(tokens / seconds, 3) if seconds > 0 else None,
           "tau": round(sum(lens) / len(lens), 4) if lens else None, "rounds": len(lens),
           "accept_len_hist": {str(k): v for k, v in sorted(Counter(lens).items())}}
    checked = [e["equal_ar"] for e in entries if "equal_ar" in e]
    out["equal_ar"] = None if not checked else {"equal": sum(checked), "compared": len(checked)}
    peak = ctx.get("peak")
    out["bandwidth_fraction"] = out["ar_equivalent_bandwidth_fraction"] = None
    if peak and seconds > 0:
        wb, kv = ctx["weight_bytes"], ctx["kv_bytes_per_slot"]
        read = equivalent = 0.0
        for e in entries:
            # slots one forward reads: the live cache (Triton kernel, transformers) or the whole static cache (SDPA)
            live = e["cache_len"] if ctx["backend"] == "sdpa" and e["cache_len"] else \
                e["prompt_tokens"] + e["new_tokens"] / 2
            if e["accept_lens"] or speculative(method):
                forwards = 1 + e["rounds"] + max(0, e["new_tokens"] - 1 - sum(e["accept_lens"]))
            else:
                forwards = e["new_tokens"]  # prefill + one decode per further token
            read += forwards * (wb + kv * live)
            equivalent += e["new_tokens"] * (wb + kv * live)
        out["bandwidth_fraction"] = round(read / seconds / peak, 4)
        # what AR would need to reach this speed: > 1 means faster than the AR roofline
        out["ar_equivalent_bandwidth_fraction"] = round(equivalent / seconds / peak, 4)
    return out


def summarize(records: list[dict], methods: list[str], ctx: dict) -> dict:
    def block(recs):
        s = {m: _pool([e for r in recs for e in r["methods"][m]["turns"]], m, ctx) for m in methods}
        for m in methods:  # against the unquantized AR; a quantized method also against its own target's AR
            me = s[m]["tokens_per_s"]
            for key, ref in (("speedup_vs_ar", "ar"), ("speedup_vs_own_ar", ar_of(m))):
                ar = s.get(ref, {}).get("tokens_per_s")
                if key == "speedup_vs_ar" or quant_of(m):
                    s[m][key] = round(me / ar, 4) if ar and me else None
        return s

    cats = defaultdict(list)
    for r in records:
        cats[r["category"]].append(r)
    return {"overall": block(records), "per_category": {c: block(rs) for c, rs in sorted(cats.items())}}


def lossless_report(records: list[dict], methods: list[str], greedy: bool) -> dict:
    checked = greedy and any(speculative(m) and ar_of(m) in methods for m in methods)
    mismatches = [{"question_id": r["question_id"], "category": r["category"], "method": m, "turn": e["turn"],
                   "first_difference": e.get("first_difference")}
                  for r in records for m in methods if speculative(m)
                  for e in r["methods"][m]["turns"] if e.get("equal_ar") is False]
    compared = sum(1 for r in records for m in methods if speculative(m) for e in r["methods"][m]["turns"]
                   if "equal_ar" in e)
    why = None if checked else ("sampling (temperature > 0): outputs are not expected to match AR" if not greedy
                                else "needs ar and an EAGLE method in --methods")
    return {"checked": checked, "ok": (not mismatches) if checked else None, "compared_turns": compared,
            "mismatches": mismatches, "why_unchecked": why}


def format_summary(res: dict) -> str:
    s, lines = res["summary"], []
    methods = list(s["overall"])
    head = f"{'':14}" + "".join(f"{m:>22}" for m in methods)
    lines += [head, "-" * len(head)]

    def cell(x):
        if x["tau"] is not None:
            return f"{x['tokens_per_s'] or 0:8.1f}t/s x{x['speedup_vs_ar'] or 0:4.2f} τ{x['tau']:4.2f}"
        return f"{x['tokens_per_s'] or 0:8.1f}t/s x{x['speedup_vs_ar'] or 0:4.2f}      "

    for name, block in [("all", s["overall"]), *s["per_category"].items()]:
        lines.append(f"{name[:14]:14}" + "".join(f"{cell(block[m]):>22}" for m in methods))
    bw = {m: v["bandwidth_fraction"] for m, v in s["overall"].items() if v["bandwidth_fraction"] is not None}
    if bw:
        lines.append("bandwidth (fraction of peak): " + ", ".join(f"{m} {v:.3f}" for m, v in bw.items()))
    ll = res["lossless"]
    if ll["checked"] and ll["ok"]:
        lines.append(f"lossless: OK (all {ll['compared_turns']} EAGLE turns equal AR token for token)")
    elif ll["checked"]:
        lines.append("!" * 78)
        lines.append(f"!!! LOSSLESSNESS FAILURE: {len(ll['mismatches'])} of {ll['compared_turns']} EAGLE turns "
                     "differ from AR !!!")
        for mm in ll["mismatches"][:20]:
            lines.append(f"!!!   question {mm['question_id']} ({mm['category']}) {mm['method']} turn "
                         f"{mm['turn']}: first difference at token {mm['first_difference']}")
        lines.append("!" * 78)
    else:
        lines.append(f"lossless: not checked ({ll['why_unchecked']})")
    return "\n".join(lines)


# --- plots -------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_questions(res: dict, path: Path):
    """Speedup over AR and tau by category; the distribution of accepted lengths."""
    plt = _pyplot()
    s = res["summary"]
    methods = list(s["overall"])
    spec = [m for m in methods if speculative(m)]
    others = [m for m in methods if m != "ar"]
    cats = ["all", *s["per_category"]]
    block = {"all": s["overall"], **s["per_category"]}
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    width = 0.8 / max(len(others), 1)
    ax = axes[0]
    if "ar" in methods:
        for i, m in enumerate(others):
            bars = ax.bar([c + i * width for c in range(len(cats))],
                          [block[c][m]["speedup_vs_ar"] or 0 for c in cats], width, label=m)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="gray", lw=1, ls="--")
        if others:
            ax.margins(y=0.2)  # room above the bars for the legend
            ax.legend(loc="upper right", ncol=len(others))
    else:
        ax.text(0.5, 0.5, "no AR baseline in this run", ha="center", transform=ax.transAxes)
    ax.set_xticks([c + width * (len(others) - 1) / 2 for c in range(len(cats))], cats, rotation=45, ha="right")
    ax.set_title("speedup over AR (tokens/s ratio)")
    ax = axes[1]
    w2 = 0.8 / max(len(spec), 1)
    for i, m in enumerate(spec):
        bars = ax.bar([c + i * w2 for c in range(len(cats))], [block[c][m]["tau"] or 0 for c in cats], w2, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([c + w2 * (len(spec) - 1) / 2 for c in range(len(cats))], cats, rotation=45, ha="right")
    ax.set_title("mean accepted length τ (tokens per target forward)")
    if spec:
        ax.margins(y=0.2)
        ax.legend(loc="upper right", ncol=len(spec))
    ax = axes[2]
    for i, m in enumerate(spec):
        hist = {int(k): v for k, v in s["overall"][m]["accept_len_hist"].items()}
        total = sum(hist.values()) or 1
        ks = sorted(hist)
        ax.bar([k + (i - (len(spec) - 1) / 2) * w2 for k in ks], [hist[k] / total for k in ks], w2, label=m)
    ax.set_xlabel("tokens emitted per round (accepted drafts + 1)")
    ax.set_ylabel("fraction of rounds")
    ax.set_title("distribution of accepted lengths")
    if spec:
        ax.legend()
    ll = res["lossless"]
    verdict = ("lossless: OK" if ll["ok"] else "LOSSLESSNESS FAILURE") if ll["checked"] else "lossless: not checked"
    fig.suptitle(f"{res['model']['name']} on {res['device']['name']} ({res['params']['dtype']}), "
                 f"{res['questions']['n']} questions / {res['questions']['turns']} turns, "
                 f"≤{res['params']['max_new_tokens']} new tokens, {res['date'][:10]} — {verdict}",
                 color="red" if ll["checked"] and not ll["ok"] else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_random(res: dict, path: Path):
    plt = _pyplot()
    lens = sorted({r["context_len"] for r in res["results"]})
    fig, axes = plt.subplots(1, len(lens), figsize=(6 * len(lens), 4.5), squeeze=False)
    for ax, L in zip(axes[0], lens):
        rows = [r for r in res["results"] if r["context_len"] == L]
        labels = [r["op"] + (f" N={r['tokens']}" if r["op"] == "verify" else "") for r in rows]
        ax.barh(labels, [r["median_ms"] for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel("ms (median)")
        ax.set_title(f"context {L}")
    fig.suptitle(f"{res['shape']} (random weights) on {res['device']['name']} ({res['params']['dtype']}), "
                 f"{res['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
