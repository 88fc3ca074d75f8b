"""Quality of the quantized targets (fasteagle.quant) against fp32: how often greedy output is unchanged, and how far
the next-token distributions move.

    python -m bench.quant_quality [--checkpoint DIR] [--modes int8,int4] [--tokens 64] [--conversations 20] [--out F]

- Greedy: for every MT-bench first turn (chat template), the first --tokens greedy tokens of each quantized model
  (quantized on load) against fp32's: the share of questions whose tokens are all equal, and the mean length of the
  common prefix.
- A fixed text: the first --conversations ShareGPT conversations of the shared data (the turns they hold: the
  shared files keep the user's first turn only; chat template, at most 512 tokens each), teacher-forced: the mean log-likelihood per token under each model, its difference to
  fp32's, KL(fp32 || quantized) per token and the share of positions whose top-1 token agrees with fp32's.
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from bench.env import header, write_json_atomic
from fasteagle.cli import run_main
from fasteagle.errors import FastEagleError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MAX_TEXT_TOKENS = 512


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="fp32 target checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--modes", default="int8,int4", help="quantization modes to compare with fp32")
    p.add_argument("--group-size", type=int, help="int4 group size (default: fasteagle.quant's)")
    p.add_argument("--questions", type=Path, default=SHARED / "mt_bench" / "question.jsonl")
    p.add_argument("--text", type=Path, default=SHARED / "sharegpt" / "ShareGPT_V3_filtered_500.json")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens compared per question")
    p.add_argument("--conversations", type=int, default=20, help="ShareGPT conversations in the fixed text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="result JSON (default: print only)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def text_ids(tok, path: Path, n: int) -> list[list[int]]:
    """The first n conversations of a ShareGPT file (of 16 tokens or more) as chat-template token ids, at most
    MAX_TEXT_TOKENS each."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise FastEagleError(f"{path}: cannot read the fixed text ({e})") from None
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    out = []
    for rec in records:
        msgs = [{"role": roles[t.get("from")], "content": t.get("value", "")}
                for t in rec.get("conversations", []) if t.get("from") in roles]
        ids = tok.encode_chat(msgs, add_generation_prompt=False)[:MAX_TEXT_TOKENS] if msgs else []
        if len(ids) >= 16:
            out.append(ids)
        if len(out) == n:
            break
    if not out:
        raise FastEagleError(f"{path}: no ShareGPT conversations of 16 tokens or more")
    return out


@torch.no_grad()
def log_probs(model, ids: list[int]) -> torch.Tensor:
    """[T - 1, vocab] log-probabilities of each next token of ids, teacher-forced in one prefill."""
    from fasteagle.model import causal_mask

    T = len(ids)
    model.setup_cache(T)
    tokens = torch.tensor([ids])
    hidden = model(tokens, torch.arange(T)[None], torch.zeros(1, dtype=torch.long), causal_mask(T))
    return torch.log_softmax(model.logits(hidden[0, :-1]).float(), -1)


def text_stats(models: dict, texts: list[list[int]], progress: bool) -> dict:
    sums = {m: {"loglik": 0.0, "kl": 0.0, "top1": 0} for m in models}
    n = 0
    for ids in tqdm(texts, desc="fixed text", disable=not progress):
        ref = log_probs(models["fp32"], ids)
        nxt = torch.tensor(ids[1:])
        n += len(nxt)
        for m, model in models.items():
            lp = ref if m == "fp32" else log_probs(model, ids)
            sums[m]["loglik"] += lp.gather(1, nxt[:, None]).sum().item()
            sums[m]["kl"] += (ref.exp() * (ref - lp)).sum().item()
            sums[m]["top1"] += (lp.argmax(-1) == ref.argmax(-1)).sum().item()
    fp = sums["fp32"]["loglik"] / n
    return {"tokens": n, **{m: {"mean_loglik": s["loglik"] / n, "loglik_minus_fp32": s["loglik"] / n - fp,
                                "kl_per_token": s["kl"] / n, "top1_agreement": s["top1"] / n}
                            for m, s in sums.items()}}


def greedy_stats(models: dict, prompts: list[list[int]], n_tokens: int, eos, progress: bool) -> dict:
    from fasteagle.engine import SpecEngine

    engines = {m: SpecEngine(model) for m, model in models.items()}
    equal = {m: 0 for m in models}
    prefix = {m: 0 for m in models}
    for ids in tqdm(prompts, desc="greedy", disable=not progress):
        ref = engines["fp32"].generate(ids, n_tokens, eos_ids=eos).tokens
        for m, engine in engines.items():
            got = ref if m == "fp32" else engine.generate(ids, n_tokens, eos_ids=eos).tokens
            equal[m] += got == ref
            prefix[m] += next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    return {"questions": len(prompts), "tokens": n_tokens,
            **{m: {"equal_share": equal[m] / len(prompts), "mean_common_prefix": prefix[m] / len(prompts)}
               for m in models}}


def run(args) -> int:
    from fasteagle.checkpoint import load_target
    from fasteagle.download import ensure_smollm2
    from fasteagle.tokenizer import load_tokenizer
    from fasteagle.questions import load_questions

    torch.set_num_threads(args.threads)
    ckpt = args.checkpoint or ensure_smollm2()
    modes = [m for m in args.modes.split(",") if m]
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    tok = load_tokenizer(ckpt, cfg)
    eos = list(cfg.get("eos_token_ids") or [])
    prompts = [tok.encode_chat([{"role": "user", "content": q["turns"][0]}]) for q in load_questions(args.questions)]
    size = max(map(len, prompts)) + args.tokens + 1  # the greedy engines' cache (the fixed text resizes it later)
    models = {"fp32": load_target(ckpt, max_seq_len=size)[0]}
    for m in modes:
        models[m] = load_target(ckpt, max_seq_len=size, quantize=m, group_size=args.group_size)[0]
    res = header(args, "quant_quality")
    res["command"] = shlex.join(["python", "-m", "bench.quant_quality", *args.argv])
    res["quantization"] = {m: models[m].quantization for m in modes}
    texts = text_ids(tok, args.text, args.conversations)  # checked before the long part
    res["greedy"] = greedy_stats(models, prompts, args.tokens, eos, not args.no_progress)
    res["fixed_text"] = text_stats(models, texts, not args.no_progress)
    for m in modes:
        g, t = res["greedy"][m], res["fixed_text"][m]
        print(f"{m}: {g['equal_share']:.0%} of {len(prompts)} answers equal fp32's first {args.tokens} tokens "
              f"(common prefix {g['mean_common_prefix']:.1f}); fixed text ({res['fixed_text']['tokens']} tokens): "
              f"log-likelihood {t['loglik_minus_fp32']:+.4f}/token vs fp32, KL {t['kl_per_token']:.4f}, "
              f"top-1 {t['top1_agreement']:.1%}")
    if args.out:
        write_json_atomic(args.out, res)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.device = "cpu"
    return run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
