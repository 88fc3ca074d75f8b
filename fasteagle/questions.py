"""Question sets: MT-bench / Spec-Bench .jsonl, one question per line (the one loader bench and train eval share)."""
import json
from pathlib import Path

from fasteagle.errors import FastEagleError


def load_questions(path, limit: int | None = None, turns: int | None = None) -> list[dict]:
    """.jsonl with {"question_id", "turns": [str, ...], "category"?} per line -> [{"question_id", "category",
    "turns"}], at most `turns` turns each and the first `limit` questions. One-line FastEagleError on a missing
    file, a malformed line, empty turns or a repeated question_id."""
    path = Path(path)
    if not path.is_file():
        raise FastEagleError(f"{path}: questions file not found")
    out, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
            qid, ts = q["question_id"], q["turns"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FastEagleError(f"{path}:{n}: not a question line (need question_id and turns): {e!r}") from None
        if not isinstance(ts, list) or not ts or not all(isinstance(t, str) for t in ts):
            raise FastEagleError(f"{path}:{n}: turns must be a non-empty list of strings")
        if qid in seen:
            raise FastEagleError(f"{path}:{n}: duplicate question_id {qid!r}")
        seen.add(qid)
        out.append({"question_id": qid, "category": str(q.get("category") or "uncategorized"),
                    "turns": ts[:turns] if turns else ts})
    if not out:
        raise FastEagleError(f"{path}: no questions")
    return out[:limit] if limit else out
