"""The draft vocabulary: the V_d target tokens a draft head may propose (EAGLE-3's reduced draft vocabulary).

Each draft level ranks candidates with an LM-head product; over the full vocabulary that is [m, V] (49,152 rows for
SmolLM2, 128,256 for Llama-3), over the draft vocabulary [m, V_d]. Verification is unchanged, so output stays
lossless: a target choice outside the draft vocabulary simply ends the accepted path.

The vocabulary is the V_d most frequent tokens of text like the head's training data (the target's own answers in
a gen-data directory, or conversation files), plus the end-of-turn tokens, stored in the head as `draft_vocab`
(target ids, most frequent first, so any prefix is itself a smaller draft vocabulary).
"""
import json
from pathlib import Path

import torch

from fasteagle.errors import FastEagleError


def counts_from_data(data_dirs, vocab_size: int) -> torch.Tensor:
    """Token counts [vocab_size] over the answers (not the prompts) of gen-data directories."""
    from fasteagle.train.data import load_dataset

    return counts_from_sequences(load_dataset(data_dirs), vocab_size)


def counts_from_sequences(seqs, vocab_size: int) -> torch.Tensor:
    """Token counts [vocab_size] over the answers of loaded training sequences (train.data.Sequence)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in seqs:
        counts += torch.bincount(s.tokens[s.prompt_len :], minlength=vocab_size)[:vocab_size]
    return counts


def _texts(rec):
    """Every turn's text of one conversation record (ShareGPT 'conversations', 'messages', MT-bench 'turns')."""
    if isinstance(rec, str):
        return [rec]
    if not isinstance(rec, dict):
        return []
    for key in ("conversations", "messages"):
        if isinstance(rec.get(key), list):
            return [t.get("value", t.get("content")) for t in rec[key] if isinstance(t, dict)]
    if isinstance(rec.get("turns"), list):
        return rec["turns"]
    return [rec.get(k) for k in ("prompt", "text", "response") if isinstance(rec.get(k), str)]


def counts_from_text(paths, tokenizer, vocab_size: int) -> torch.Tensor:
    """Token counts [vocab_size] over every turn of JSON / JSONL conversation files."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for path in map(Path, paths):
        if not path.is_file():
            raise FastEagleError(f"{path}: text file not found")
        raw = path.read_text(encoding="utf-8")
        try:
            records = [json.loads(x) for x in raw.splitlines() if x.strip()] if path.suffix == ".jsonl" else json.loads(raw)
        except json.JSONDecodeError as e:
            raise FastEagleError(f"{path}: not valid JSON ({e})") from None
        for rec in records if isinstance(records, list) else [records]:
            for text in _texts(rec):
                if isinstance(text, str) and text:
                    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
                    counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


def draft_vocab(counts: torch.Tensor, size: int, always=()) -> torch.Tensor:
    """The `size` most frequent token ids (ties: lower id first), most frequent first; `always` (e.g. the EOS ids)
    are included whatever their count."""
    V = counts.shape[0]
    if not 1 <= size <= V:
        raise FastEagleError(f"--size must be in [1, {V}] (the target's vocabulary), got {size}")
    score = counts.double().clone()
    for t in always:
        score[t] = float("inf")
    order = torch.sort(-score, stable=True).indices
    return order[:size].clone()


def coverage(counts: torch.Tensor, vocab: torch.Tensor) -> float:
    """Share of the counted tokens that the vocabulary contains."""
    total = int(counts.sum())
    return int(counts[vocab].sum()) / total if total else 0.0


def write_head_with_vocab(head_dir, out_dir, vocab: torch.Tensor, provenance: dict):
    """Copy the draft head at head_dir to out_dir (written atomically) with `vocab` as its draft vocabulary."""
    from safetensors.torch import load_file

    from fasteagle.checkpoint import WEIGHTS, atomic_output_dir, read_config, write_checkpoint

    cfg = read_config(head_dir, "draft")
    state = load_file(str(Path(head_dir) / WEIGHTS))
    state["draft_vocab"] = vocab.to(torch.long).contiguous()
    cfg = {k: v for k, v in cfg.items() if k != "format"}
    cfg["draft_vocab_size"] = int(vocab.shape[0])
    cfg["draft_vocab"] = provenance
    with atomic_output_dir(out_dir) as tmp:
        write_checkpoint(tmp, cfg, state)
        for extra in Path(head_dir).iterdir():  # the card, evaluation results, calibration: kept as they are
            if extra.is_file() and extra.name not in (WEIGHTS, "config.json"):
                (tmp / extra.name).write_bytes(extra.read_bytes())
