"""What every command-line entry point shares: one line per error, and interrupts that exit cleanly.

Ctrl-C exits with status 130 and SIGTERM with 143, each with one line on stderr. SIGTERM is raised as `Terminated`
(a KeyboardInterrupt) while a command runs, so `finally` blocks run (temporary directories are removed, a child
pip is killed) as they do for Ctrl-C. Nothing here changes process state on import: handlers are installed by
`run_main` / `sigterm_as_interrupt` only for the duration of a command."""
import argparse
import signal
import sys
import threading
from contextlib import contextmanager

from fasteagle.errors import FastEagleError

# packages the base install provides, and optional ones with the extra that installs them
BASE_PACKAGES = {"gguf", "tokenizers", "tiktoken", "sentencepiece", "safetensors", "numpy", "tqdm", "matplotlib",
                 "triton", "torch", "jinja2"}
EXTRAS = {"transformers": "hf", "accelerate": "test", "scipy": "test", "pytest": "test", "openai": "test",
          "psutil": "test", "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that cleanup runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def sigterm_as_interrupt():
    """While the body runs, SIGTERM raises Terminated (in the main thread; elsewhere this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted(e: KeyboardInterrupt) -> int:
    """Print the one line for an interrupt; return the exit status (130 for Ctrl-C, 143 for SIGTERM)."""
    what = "terminated" if isinstance(e, Terminated) else "interrupted"
    print(what + (f": {e}" if str(e) else ""), file=sys.stderr)
    return 143 if isinstance(e, Terminated) else 130


def missing_package(name: str | None) -> str | None:
    """The one line for a missing third-party package, or None if `name` is not one we know."""
    top = (name or "").split(".")[0]
    if top in EXTRAS:
        return f"this needs the optional package {top!r}: pip install -e '.[{EXTRAS[top]}]'"
    if top in BASE_PACKAGES:
        return f"the package {top!r} is missing (fasteagle's base install includes it): pip install -e ."
    return None


def run_main(fn, *args) -> int:
    """Run a command's body: FastEagleError and missing packages -> `error: ...` (1), Ctrl-C (130), SIGTERM (143)."""
    with sigterm_as_interrupt():
        try:
            return fn(*args) or 0
        except FastEagleError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except ModuleNotFoundError as e:
            line = missing_package(e.name)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:
            return interrupted(e)


# --- flags the commands share ----------------------------------------------------------------------------------------

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str | None, device: str):
    """A --dtype value as a torch dtype; unset: bfloat16 on cuda, float32 on cpu."""
    import torch

    return getattr(torch, name or ("bfloat16" if device == "cuda" else "float32"))


def add_device_flags(p):
    """--device (cuda when there is one) and --dtype (torch_dtype)."""
    import torch

    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: bfloat16 on cuda, float32 on cpu")


def add_compile_flags(p, what: str = "the decode phases"):
    """--compile, and --cpp-wrapper (apply_compile_flags)."""
    p.add_argument("--compile", action="store_true", help=f"torch.compile {what} (CUDA graphs on GPU)")
    p.add_argument("--cpp-wrapper", action="store_true",
                   help="with --compile on a CPU: graphs call their kernels from C++ (~2 ms less per SmolLM2 step on "
                        "2 cores; each graph compiles longer)")


def apply_compile_flags(args):
    """Check --cpp-wrapper and turn it on (process-wide: fasteagle.compiling.use_cpp_wrapper)."""
    if not args.cpp_wrapper:
        return
    if not args.compile or args.device != "cpu":
        raise FastEagleError("--cpp-wrapper needs --compile on the CPU (on a GPU the graphs replay as CUDA graphs)")
    from fasteagle.compiling import use_cpp_wrapper

    use_cpp_wrapper()


def add_draft_int8_flag(p):
    p.add_argument("--draft-int8", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: run the draft head through int8 copies of its weights (faster drafting; the output "
                        "stays exactly the target's)")
