"""What every result file records about where and how it was measured: device, versions, commit, parameters."""
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
from pathlib import Path

import torch

from bench.shapes import peak_bandwidth
from fasteagle.errors import FastEagleError

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SCHEMA = "fasteagle-bench-latency/1"


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD, whether tracked files differ from it); read-only git (no index refresh)."""
    def git(*cmd):
        return subprocess.run(["git", "--no-optional-locks", *cmd], cwd=BENCH, capture_output=True, text=True,
                              timeout=20)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None, None
        status = git("status", "--porcelain", "--untracked-files=no")
        return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_info(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
        return {"type": "cuda", "name": name, "peak_bandwidth_bytes_per_s": peak_bandwidth(name),
                "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": cpu_name(), "peak_bandwidth_bytes_per_s": None, "threads": torch.get_num_threads(),
            "cores": os.cpu_count()}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": None, "transformers": None,
           "cuda": torch.version.cuda}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def write_json_atomic(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def csv_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FastEagleError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise FastEagleError(f"{what} must list positive integers, got {text!r}")
    return vals


def header(args, mode: str) -> dict:
    """The top of every result file. args.argv: the command-line arguments, recorded as the command to rerun."""
    commit, dirty = git_commit()
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "argv"}
    return {"schema": SCHEMA, "mode": mode, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": commit, "commit_dirty": dirty,
            "command": shlex.join(["python", "-m", "bench.latency", *getattr(args, "argv", [])]),
            "device": device_info(args.device), "versions": versions(), "params": params}


def default_out(args, model_name: str, mode: str) -> Path:
    dev = "cpu" if args.device == "cpu" else slug(torch.cuda.get_device_name())
    date = datetime.date.today().isoformat()
    return RESULTS / f"latency-{mode}{slug(model_name)}-{dev}-{date}.json"
