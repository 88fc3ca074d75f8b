"""The optional CPU baseline: llama.cpp decoding the GGUF file itself, the program a CPU user runs today.

llama.cpp is reached through the prebuilt library inside the `llama-cpp-cffi` wheel (0.3.1: newer wheels need a
newer libstdc++ than Debian 12's), without its Python package, whose pins (transformers, huggingface-hub) would
fight this project's:

    pip install --no-deps llama-cpp-cffi==0.3.1

(llama-cpp-python has no prebuilt wheel on PyPI; it builds from source in about an hour on 2 cores.) That library is
a portable build (AVX2, no AVX-512): a llama.cpp compiled for the machine can be faster, and the results say which
build ran. It decodes greedily from the same token ids the other methods get (the GGUF's vocabulary is the
converted checkpoint's), one llama_decode per token and an argmax over its logits, as `llama-cli --temp 0` does.
"""
import importlib.util
import time
from pathlib import Path

import numpy as np

from fasteagle.errors import FastEagleError

PACKAGE = "llama-cpp-cffi==0.3.1"
_LIB = None


def shared_object() -> Path | None:
    """llama-cpp-cffi's CPU build of llama.cpp, when installed."""
    spec = importlib.util.find_spec("llama")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("_llama_cpp_cpu*.so")) if spec else []
    return found[0] if found else None


def _library():
    """(lib, ffi) of llama-cpp-cffi's CPU build, loaded by path (its package __init__ would import its pins)."""
    global _LIB
    if _LIB is None:
        so = shared_object()
        if so is None:
            raise FastEagleError(f"method 'llamacpp' needs llama.cpp: pip install --no-deps {PACKAGE}")
        mod_spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", so)
        mod = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(mod)
        except ImportError as e:
            raise FastEagleError(f"method 'llamacpp': cannot load {so.name} ({e}); {PACKAGE} is the wheel that "
                                 f"loads on Debian 12's libstdc++") from None
        lib, ffi = mod.lib, mod.ffi

        @ffi.def_extern(name="llama_cpp_cffi_ggml_log_callback")
        def _quiet(level, text, user_data):  # llama.cpp's loading chatter stays out of the bench's output
            pass

        lib.llama_log_set(lib.llama_cpp_cffi_ggml_log_callback, ffi.NULL)
        lib.llama_backend_init()
        _LIB = lib, ffi
    return _LIB


class LlamaCpp:
    """One GGUF loaded in llama.cpp with a context of n_ctx tokens, decoding on n_threads threads."""

    def __init__(self, gguf: Path, n_ctx: int, n_threads: int):
        lib, ffi = self.lib, self.ffi = _library()
        if not Path(gguf).is_file():
            raise FastEagleError(f"method 'llamacpp': no GGUF file at {gguf}")
        self.model = lib.llama_load_model_from_file(str(gguf).encode(), lib.llama_model_default_params())
        if self.model == ffi.NULL:
            raise FastEagleError(f"method 'llamacpp': llama.cpp cannot load {gguf}")
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = n_ctx
        params.n_threads = params.n_threads_batch = n_threads
        self.ctx = lib.llama_new_context_with_model(self.model, params)
        if self.ctx == ffi.NULL:
            raise FastEagleError(f"method 'llamacpp': no llama.cpp context of {n_ctx} tokens")
        self.n_ctx, self.vocab = n_ctx, lib.llama_n_vocab(self.model)
        self.system_info = ffi.string(lib.llama_print_system_info()).decode().strip()

    def next_logits(self, ids: list[int]) -> np.ndarray:
        """Decode ids after the cached tokens: the logits [vocab] after the last (a view of llama.cpp's buffer)."""
        tokens = self.ffi.new("llama_token[]", ids)
        if self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(tokens, len(ids))) != 0:
            raise FastEagleError("method 'llamacpp': llama_decode failed")
        logits = self.lib.llama_get_logits_ith(self.ctx, -1)
        return np.frombuffer(self.ffi.buffer(logits, self.vocab * 4), dtype=np.float32)

    def reset(self):
        self.lib.llama_kv_cache_clear(self.ctx)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_ids=()) -> tuple[list[int], float]:
        """Greedy: (new tokens, up to and including an EOS; seconds, prefill included)."""
        if len(prompt_ids) + max_new_tokens > self.n_ctx:
            raise FastEagleError(f"method 'llamacpp': {len(prompt_ids)} + {max_new_tokens} tokens exceed its "
                                 f"context of {self.n_ctx}")
        self.reset()
        t0 = time.perf_counter()
        new = [int(self.next_logits(list(prompt_ids)).argmax())]
        while len(new) < max_new_tokens and new[-1] not in eos_ids:
            new.append(int(self.next_logits(new[-1:]).argmax()))
        return new, time.perf_counter() - t0

    def close(self):
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.lib.llama_free_model(self.model)
            self.ctx = None
