"""python -m fasteagle.convert {hf,gguf,llama2c} SRC OUT_DIR [--tokenizer PATH] [--dtype float32|float16|bfloat16]
   python -m fasteagle.convert eagle SRC OUT_DIR --target TARGET_DIR   (EAGLE-1/2 draft heads)

Each subcommand writes one fasteagle checkpoint (config.json + model.safetensors + tokenizer files) into OUT_DIR,
atomically: a failed conversion leaves no OUT_DIR behind. To add a subcommand, write an `add_X(subparsers)` that
registers its parser with `set_defaults(run=...)` and append it to SUBCOMMANDS."""
import argparse
import sys
import warnings

from fasteagle.cli import run_main
from fasteagle.convert.common import DTYPES
from fasteagle.convert.eagle import add_eagle


def _add_target(sub, name: str, help: str, src_help: str, tok_help: str, run):
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("src", metavar="SRC", help=src_help)
    p.add_argument("out_dir", metavar="OUT_DIR", help="output checkpoint directory (must not exist or be empty)")
    p.add_argument("--tokenizer", metavar="PATH", help=tok_help)
    p.add_argument("--dtype", choices=list(DTYPES), help="weight dtype to store (default: see above)")
    p.set_defaults(run=lambda a: run(a.src, a.out_dir, dtype=a.dtype, tokenizer=a.tokenizer))
    return p


def add_hf(sub):
    from fasteagle.convert.hf import convert_hf

    _add_target(sub, "hf", "Hugging Face Llama/Mistral/Mixtral/Qwen2/Qwen3 model directory (default dtype: the "
                "config's)",
                "model directory with config.json and *.safetensors or pytorch_model*.bin",
                "directory with HF tokenizer files (default: SRC)", convert_hf)


def add_gguf(sub):
    from fasteagle.convert.gguf import convert_gguf

    p = _add_target(sub, "gguf", "GGUF file (llama, qwen2, qwen3 architecture), dequantized unless --keep-quantized "
                    "(default dtype: float32)", "the .gguf file",
                    "directory with HF tokenizer files (default: the tokenizer in the GGUF metadata)", convert_gguf)
    p.add_argument("--keep-quantized", action="store_true",
                   help="keep Q4_0 / Q4_1 / Q8_0 weights quantized (int4 / int8 in groups of 32, value for value): "
                        "a quantized checkpoint, as python -m fasteagle.quantize writes")
    p.set_defaults(run=lambda a: convert_gguf(a.src, a.out_dir, dtype=a.dtype, tokenizer=a.tokenizer,
                                              keep_quantized=a.keep_quantized))


def add_llama2c(sub):
    from fasteagle.convert.llama2c import convert_llama2c

    _add_target(sub, "llama2c", "llama2.c .bin checkpoint, legacy or version-1 export (default dtype: float32)",
                "the .bin checkpoint", "llama2.c tokenizer.bin (default: tokenizer.bin beside SRC)", convert_llama2c)


SUBCOMMANDS = [add_hf, add_gguf, add_llama2c, add_eagle]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fasteagle.convert",
                                     description="Convert a model into a fasteagle checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(
        f.__name__.removeprefix("add_") for f in SUBCOMMANDS) + "}")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _format_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"  # for users: no file/line of the code that warned


def _run(args):
    saved, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        out = args.run(args)
    finally:
        warnings.formatwarning = saved
    if out is not None:
        print(f"wrote {out}")


def main(argv=None) -> int:
    """Exit status 0, 1 (`error: ...`), 130 (Ctrl-C) or 143 (SIGTERM); interrupted conversions leave nothing."""
    return run_main(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
