"""A head's acceptance per tree shape, measured once and stored with it (calibration.json), for the shape chooser.

Greedy EAGLE-2 runs of every candidate shape on held-out prompts (never the benchmark's questions); tau = tokens
emitted per round, pooled over all rounds. fasteagle.autotune combines it with the machine's measured costs.
"""
import json
import os
from pathlib import Path

from tqdm import tqdm

from fasteagle.autotune import CALIBRATION, CANDIDATES, Shape


def calibrate(target, head, prompts: list[list[int]], max_new_tokens: int, eos_ids=(), shapes=CANDIDATES) -> list:
    """[{"depth", "top_k", "total_tokens", "tau", "rounds"}] for each shape, greedy, on the given prompt ids."""
    from fasteagle.engine import SpecEngine

    rows = []
    for d, k, n in tqdm(shapes, desc="calibrate", unit="shape"):
        engine = SpecEngine(target, head, depth=d, top_k=k, total_tokens=n)
        lens = []
        for ids in prompts:
            lens += engine.generate(ids, max_new_tokens, eos_ids=eos_ids).accept_lens
        rows.append({"depth": d, "top_k": k, "total_tokens": n, "tau": round(sum(lens) / len(lens), 4),
                     "rounds": len(lens)})
    return rows


def write_calibration(head_dir, rows: list, provenance: dict):
    path = Path(head_dir) / CALIBRATION
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"shapes": rows, **provenance}, indent=1) + "\n")
    os.replace(tmp, path)
    return {Shape(r["depth"], r["top_k"], r["total_tokens"]): r["tau"] for r in rows}
