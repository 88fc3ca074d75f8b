"""Training data for a draft head: the target answers prompts itself (self-distillation) and its features are kept.

Why self-distillation: the prompt sets carry no responses, and what the head must predict at inference is the
target's own continuation, so the target's greedy answers (in its chat template) are exactly the right labels.

On disk (DATA_DIR):
  manifest.json       settings, the ordered prompt plan, and the finished shards (rewritten atomically per shard)
  shard-00000.safetensors, ...   one per generation batch:
      tokens      int32 [N]          all sequences of the shard concatenated (prompt + answer, EOS included)
      features    fp16  [N, dim]     features[i] = the target's final-normed last hidden state at token i
                                     (the LM-head input); the last token of each sequence has no feature (zeros).
                                     EAGLE-3 data (settings "taps"): [N, (len(taps) + 1) * dim], the inputs of
                                     the tapped layers, then the final-normed hidden state
      offsets     int64 [n_seq + 1]  sequence s is tokens[offsets[s]:offsets[s + 1]]
      prompt_lens int32 [n_seq]      the first prompt_lens[s] tokens of a sequence are the prompt
A run is resumable: batches whose shard is listed in the manifest are skipped.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from fasteagle.errors import FastEagleError
from fasteagle.model import causal_mask, kv_caches

DATA_FORMAT = "fasteagle-train-data-v1"
MANIFEST = "manifest.json"


# --- prompts ---------------------------------------------------------------------------------------------------------


def _first_user_turn(rec):
    """The first user turn of one record in any of the usual conversation layouts, or None."""
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get("conversations"), list):  # ShareGPT: {"from": "human", "value": ...}
        for turn in rec["conversations"]:
            if isinstance(turn, dict) and turn.get("from", turn.get("role")) in ("human", "user"):
                return turn.get("value", turn.get("content"))
        return None
    if isinstance(rec.get("messages"), list):  # OpenAI style: {"role": "user", "content": ...}
        for turn in rec["messages"]:
            if isinstance(turn, dict) and turn.get("role") == "user":
                return turn.get("content")
        return None
    if isinstance(rec.get("turns"), list) and rec["turns"]:  # MT-bench
        return rec["turns"][0]
    for key in ("prompt", "instruction", "question", "text"):
        if isinstance(rec.get(key), str):
            return rec[key]
    return None


def load_prompts(paths) -> list[str]:
    """First user turns from JSON (a list of records) or JSONL files; empty ones skipped, duplicates dropped."""
    prompts, seen = [], set()
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FastEagleError(f"{path}: prompt file not found")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".jsonl":
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                records = json.loads(text)
        except json.JSONDecodeError as e:
            raise FastEagleError(f"{path}: not valid JSON{' lines' if path.suffix == '.jsonl' else ''} ({e})") from None
        if isinstance(records, dict):
            records = records.get("data", records.get("conversations", [records]))
        if not isinstance(records, list):
            raise FastEagleError(f"{path}: expected a list of conversations")
        n_before = len(prompts)
        for rec in records:
            p = _first_user_turn(rec)
            if isinstance(p, str) and p.strip() and p not in seen:
                seen.add(p)
                prompts.append(p)
        if len(prompts) == n_before and records:
            raise FastEagleError(f"{path}: no user prompts found (expected ShareGPT 'conversations', "
                                 f"'messages', MT-bench 'turns' or 'prompt' records)")
    return prompts


# --- batched greedy generation ---------------------------------------------------------------------------------------


def _compact_cache(target, keep: torch.Tensor, max_seq_len: int):
    """Drop finished rows from the target's batched KV cache (rows `keep` stay, in order)."""
    kept = [(c.k[keep], c.v[keep]) for c in kv_caches(target)]  # advanced indexing copies
    target.setup_cache(max_seq_len, batch=len(keep))
    for c, (k, v) in zip(kv_caches(target), kept):
        c.k.copy_(k)
        c.v.copy_(v)


@torch.no_grad()
def _forward(target, tokens, positions, cache_len, mask, taps, final=False):
    """(final-normed hidden state, the draft's features): the same tensor unless taps (EAGLE-3; final: the hidden
    state appended to the tapped streams)."""
    if taps:
        hidden, tapped = target(tokens, positions, cache_len, mask, taps=taps)
        return hidden, torch.cat([tapped, hidden], -1) if final else tapped
    hidden = target(tokens, positions, cache_len, mask)
    return hidden, hidden


def generate_batch(target, prompts: list[list[int]], max_new_tokens: int, eos_ids=(), taps: tuple = (),
                   final: bool = False):
    """Greedy answers for a batch of prompts, with the features of every token that went through the target.

    Rows are right-padded; each row's cache_len is its own length, so the pad junk in its cache is never visible.
    Finished rows are dropped from the batch once half of them are done. Returns one (tokens [N] int64,
    features [N, dim] fp32 with a zero last row) per prompt, N = prompt + answer length.
    max_new_tokens = 0: no answers, the prompts' own features only (prefill; the last row is real then).
    taps: the features are the inputs of those target layers, concatenated (an EAGLE-3 head's), [N, len(taps) * dim];
    default: the final-normed hidden state (EAGLE-1/2). final (with taps): the final-normed hidden state is appended
    after them, [N, (len(taps) + 1) * dim] (EAGLE-3 training data: the target's distribution comes from it)."""
    B, dev = len(prompts), target.embed.weight.device
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    Tp = int(lens.max())
    S = Tp + max_new_tokens
    target.setup_cache(S, batch=B)
    tokens = torch.zeros(B, Tp, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    pos = torch.arange(Tp, device=dev)[None].expand(B, Tp)
    hidden, feats = _forward(target, tokens, pos, torch.zeros(B, dtype=torch.long, device=dev), causal_mask(Tp, dev),
                             taps, final)
    prompt_feats = [feats[b, : len(p)].float().cpu() for b, p in enumerate(prompts)]
    if max_new_tokens == 0:
        return [(torch.tensor(p, dtype=torch.long), f) for p, f in zip(prompts, prompt_feats)]
    nxt = target.logits(hidden[torch.arange(B, device=dev), lens - 1]).argmax(-1)  # [B]
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=dev)

    answers = [[] for _ in range(B)]
    answer_feats = [[] for _ in range(B)]
    rows = torch.arange(B)  # original index of each live batch row
    finished = torch.zeros(B, dtype=torch.bool, device=dev)  # the row's answer already ended with EOS
    cache_len = lens.clone()
    for step in range(max_new_tokens):
        for b, t, f in zip(rows.tolist(), nxt.tolist(), finished.tolist()):
            if not f:
                answers[b].append(t)
        finished |= torch.isin(nxt, eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if 2 * int(finished.sum()) >= len(rows):  # shrink the batch when half of it is finished
            keep = (~finished).nonzero()[:, 0]
            _compact_cache(target, keep, S)
            rows, nxt, cache_len, finished = rows[keep.cpu()], nxt[keep], cache_len[keep], finished[keep]
        hidden, feats = _forward(target, nxt[:, None], cache_len[:, None], cache_len, causal_mask(1, dev), taps, final)
        hidden, feats = hidden[:, 0], feats[:, 0].float().cpu()  # [B', dim], [B', feature width]
        for i, (b, f) in enumerate(zip(rows.tolist(), finished.tolist())):
            if not f:  # the feature of the answer token just fed
                answer_feats[b].append(feats[i])
        nxt = target.logits(hidden).argmax(-1)
        cache_len = cache_len + 1

    out = []
    for b, p in enumerate(prompts):
        toks = torch.tensor(p + answers[b], dtype=torch.long)
        dim = prompt_feats[b].shape[1]
        # features exist for every token fed to the target: the prompt and all answer tokens but the last
        feats = torch.cat([prompt_feats[b], torch.stack(answer_feats[b]) if answer_feats[b] else torch.zeros(0, dim),
                           torch.zeros(1, dim)])
        assert feats.shape[0] == toks.shape[0], (feats.shape, toks.shape)
        out.append((toks, feats))
    return out


# --- shards ----------------------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, obj):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def write_shard(path: Path, seqs, prompt_lens):
    tokens = torch.cat([t for t, _ in seqs]).to(torch.int32)
    features = torch.cat([f for _, f in seqs]).to(torch.float16)
    offsets = torch.tensor([0] + [len(t) for t, _ in seqs]).cumsum(0)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"tokens": tokens, "features": features, "offsets": offsets,
               "prompt_lens": torch.tensor(prompt_lens, dtype=torch.int32)}, str(tmp))
    os.replace(tmp, path)
    return int(tokens.shape[0])


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def gen_data(target, prompt_ids: list[list[int]], out_dir, *, max_new_tokens: int, batch_size: int, eos_ids=(),
             max_prompt_tokens: int = 512, taps: tuple = (), source: dict | None = None, progress: bool = True) -> dict:
    """Generate (or resume generating) a training set from tokenized prompts. Returns the manifest.

    Prompts longer than max_prompt_tokens are skipped (their cost is prefill, not training signal); batch i of
    the plan becomes shard i. max_new_tokens = 0 keeps only the prompts' features (teacher-forced text, no
    self-distilled answers: for fit's loss_positions="all"). taps: EAGLE-3 data, the features are the inputs of
    those target layers and the final-normed hidden state, concatenated ([N, (len(taps) + 1) * dim])."""
    if max_new_tokens < 0 or batch_size < 1:
        raise FastEagleError("max-new-tokens must be >= 0 and batch-size >= 1")
    out_dir = Path(out_dir)
    keep = [i for i, p in enumerate(prompt_ids) if 0 < len(p) <= max_prompt_tokens]
    if not keep:
        raise FastEagleError(f"no prompt has 1..{max_prompt_tokens} tokens")
    # sort by length within groups of 8 batches: little padding, yet the first shards already sample the whole set
    # (so a run stopped early still trains on representative data)
    group = 8 * batch_size
    keep = [i for g in range(0, len(keep), group) for i in sorted(keep[g : g + group], key=lambda i: len(prompt_ids[i]))]
    batches = [keep[i : i + batch_size] for i in range(0, len(keep), batch_size)]
    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "eos_ids": sorted(set(eos_ids)),
                "max_prompt_tokens": max_prompt_tokens, "dim": target.args.dim, "vocab_size": target.args.vocab_size,
                "prompts": _fingerprint(prompt_ids), **({"taps": list(taps)} if taps else {})}
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        manifest = read_manifest(out_dir)
        if manifest["settings"] != settings:
            diff = sorted(k for k in settings if manifest["settings"].get(k) != settings[k])
            raise FastEagleError(f"{out_dir}: holds data generated with other settings ({', '.join(diff)}); "
                                 f"use another --out directory")
    else:
        if out_dir.exists() and any(out_dir.iterdir()):
            raise FastEagleError(f"{out_dir}: exists, is not empty and has no {MANIFEST}")
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"format": DATA_FORMAT, "settings": settings, "source": source or {},
                    "n_prompts": len(prompt_ids), "n_skipped_long": len(prompt_ids) - len(keep),
                    "n_batches": len(batches), "shards": []}
        _write_json_atomic(manifest_path, manifest)
    done = {s["batch"] for s in manifest["shards"]}
    todo = [b for b in range(len(batches)) if b not in done]
    bar = tqdm(total=len(keep), initial=sum(len(batches[b]) for b in done), unit="prompt", desc="gen-data",
               disable=not progress, dynamic_ncols=True)
    for b in todo:
        idx = batches[b]
        seqs = generate_batch(target, [prompt_ids[i] for i in idx], max_new_tokens, eos_ids, taps, final=bool(taps))
        name = f"shard-{b:05d}.safetensors"
        n_tok = write_shard(out_dir / name, seqs, [len(prompt_ids[i]) for i in idx])
        n_ans = sum(len(t) - len(prompt_ids[i]) for (t, _), i in zip(seqs, idx))
        manifest["shards"].append({"batch": b, "file": name, "prompt_indices": idx, "n_tokens": n_tok,
                                   "n_answer_tokens": n_ans})
        _write_json_atomic(manifest_path, manifest)
        bar.update(len(idx))
        bar.set_postfix(answer_tokens=sum(s["n_answer_tokens"] for s in manifest["shards"]))
    bar.close()
    return manifest


def read_manifest(data_dir) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FastEagleError(f"{data_dir}: no {MANIFEST} (generate data first with `python -m fasteagle.train gen-data`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FastEagleError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != DATA_FORMAT:
        raise FastEagleError(f"{path}: unknown data format {manifest.get('format')!r} (expected {DATA_FORMAT!r})")
    return manifest


# --- loading for training --------------------------------------------------------------------------------------------


@dataclass
class Sequence:
    tokens: torch.Tensor  # [N] int64
    features: torch.Tensor  # [N, dim] fp16 (last row unused); EAGLE-3 data: [N, (len(taps) + 1) * dim]
    prompt_len: int


def load_dataset(data_dirs, dim: int | None = None) -> list[Sequence]:
    """All finished shards' sequences of one or several data directories (features stay fp16 in memory).

    A prompt that occurs more than once (two data directories made from overlapping prompt files) is kept once,
    with the longest answer: the target's greedy answers to one prompt are the same, and a duplicate would be
    trained on twice or, worse, sit on both sides of the validation split."""
    dirs = data_dirs if isinstance(data_dirs, (list, tuple)) else [data_dirs]
    by_prompt: dict[tuple, int] = {}
    seqs: list[Sequence] = []
    for s in (s for d in dirs for s in _load_dir(d, dim)):
        key = tuple(s.tokens[: s.prompt_len].tolist())
        if key not in by_prompt:
            by_prompt[key] = len(seqs)
            seqs.append(s)
        elif len(s.tokens) > len(seqs[by_prompt[key]].tokens):
            seqs[by_prompt[key]] = s
    return seqs


def _load_dir(data_dir, dim: int | None) -> list[Sequence]:
    manifest = read_manifest(data_dir)
    if not manifest["shards"]:
        raise FastEagleError(f"{data_dir}: no finished shards yet")
    if dim is not None and manifest["settings"]["dim"] != dim:
        raise FastEagleError(f"{data_dir}: features have dim {manifest['settings']['dim']}, the target has {dim}")
    seqs = []
    for shard in sorted(manifest["shards"], key=lambda s: s["batch"]):
        path = Path(data_dir) / shard["file"]
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise FastEagleError(f"{path}: cannot read shard ({e})") from None
        off = t["offsets"].tolist()
        for s in range(len(off) - 1):
            seqs.append(Sequence(t["tokens"][off[s] : off[s + 1]].long(), t["features"][off[s] : off[s + 1]],
                                 int(t["prompt_lens"][s])))
    return seqs


def data_taps(data_dirs) -> tuple[int, ...]:
    """The target layers the data's features tap (EAGLE-3 data; () for EAGLE-1/2 data), the same in every directory."""
    dirs = data_dirs if isinstance(data_dirs, (list, tuple)) else [data_dirs]
    found = {tuple(read_manifest(d)["settings"].get("taps", ())) for d in dirs}
    if len(found) > 1:
        raise FastEagleError(f"the data directories tap different target layers ({sorted(found)}); train on one kind")
    return found.pop()
