"""python -m fasteagle.quantize CKPT OUT --mode int8|int4 [--group-size 32|64|128]

Quantize a converted fp target checkpoint's linear layers and LM head (fasteagle/quant.py: int8 per output channel,
int4 in groups of --group-size inputs, default 32) into OUT, an ordinary fasteagle checkpoint that generate, bench,
train eval and the server load as they load any other; its tokenizer files and chat template are copied over. OUT
is written atomically: a failed or interrupted run leaves nothing behind.
"""
import argparse
import shutil
import sys
from pathlib import Path

import torch

from fasteagle.errors import FastEagleError


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fasteagle.quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", type=Path, help="converted fp target checkpoint")
    p.add_argument("out", metavar="OUT", type=Path, help="output checkpoint directory (must not exist or be empty)")
    p.add_argument("--mode", required=True, help="int8 or int4")
    p.add_argument("--group-size", type=int, help="int4: inputs per (scale, zero) group: 32, 64 or 128 (default 32)")
    return p.parse_args(argv)


def settings(cfg: dict, mode: str, group_size: int | None, where) -> int | None:
    """The checked group size (int4's default filled in) for quantizing the target `cfg` describes."""
    from fasteagle import quant
    from fasteagle.model import ModelArgs, Transformer

    if cfg.get("quantization"):
        raise FastEagleError(f"{where}: already quantized ({cfg['quantization']}); quantize its fp source instead")
    try:
        args = ModelArgs.from_dict(cfg["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise FastEagleError(f"{where}: bad model config: {e}") from None
    with torch.device("meta"):
        return quant.check_settings(Transformer(args), mode, group_size)


def run(args):
    from tqdm import tqdm

    from fasteagle import quant
    from fasteagle.checkpoint import atomic_output_dir, load_target, read_config, write_checkpoint

    cfg = read_config(args.checkpoint, "target")
    group_size = settings(cfg, args.mode, args.group_size, args.checkpoint)
    with atomic_output_dir(args.out) as tmp:
        model, _ = load_target(args.checkpoint, max_seq_len=1)
        quant.quantize_model(model, args.mode, group_size, progress=lambda layers: tqdm(
            layers, desc="quantize", unit="layer", disable=None, file=sys.stderr))
        config = {k: v for k, v in cfg.items() if k != "format"}
        write_checkpoint(tmp, {**config, "quantization": model.quantization}, model.state_dict())
        if isinstance(cfg.get("tokenizer"), dict) and cfg["tokenizer"].get("file"):
            shutil.copyfile(args.checkpoint / cfg["tokenizer"]["file"], tmp / cfg["tokenizer"]["file"])
    print(args.out)


def main(argv=None) -> int:
    from fasteagle.cli import run_main

    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
