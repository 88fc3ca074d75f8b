"""Tokenizers: one small interface over the four formats LLaMA-family checkpoints ship with, and chat templates.

  base.py     the interface: encode, encode_chat / render_chat_text, decode, stream
  formats.py  the four tokenizer types (llama2c, sentencepiece, hf, tiktoken) and load_tokenizer
  export.py   tokenizer files and config entries from an HF directory, GGUF metadata or a llama2.c tokenizer.bin
  chat.py     chat templates: the model's own Jinja template, rendered as transformers does; hand-written fallbacks
  stream.py   ids -> text, whole or streamed

Checkpoint config entries (written by the export_* functions, read by load_tokenizer):
  {"tokenizer": {"type", "file", ...type-specific extras}, "bos_token_id", "eos_token_ids", "add_bos",
   "chat_template_jinja": the source model's Jinja chat template | None,
   "bos_token", "eos_token": the text that template sees as bos_token / eos_token (None: undefined)}
Checkpoints converted before templates were stored have no "chat_template_jinja" but a hand-written template's name,
"chat_template": "llama-2" | "vicuna" | "llama-3" | "chatml" | None (ChatML's default system message in
"tokenizer": {"default_system"}); they load and render as before.
"""
from fasteagle.tokenizer.base import Tokenizer
from fasteagle.tokenizer.chat import CHAT_TEMPLATES, VICUNA_SYSTEM, Special, render_chat, render_jinja
from fasteagle.tokenizer.export import export_tokenizer_gguf, export_tokenizer_hf, export_tokenizer_llama2c
from fasteagle.tokenizer.formats import (LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, QWEN2_PATTERN, bytes_to_unicode,
                                         load_tokenizer, read_llama2c_bin, read_tiktoken_ranks, write_llama2c_bin)
from fasteagle.tokenizer.stream import StreamDecoder

__all__ = [
    "Tokenizer", "StreamDecoder", "load_tokenizer",
    "export_tokenizer_gguf", "export_tokenizer_hf", "export_tokenizer_llama2c",
    "CHAT_TEMPLATES", "VICUNA_SYSTEM", "Special", "render_chat", "render_jinja",
    "LLAMA3_PATTERN", "LLAMA3_SPECIAL_TOKENS", "QWEN2_PATTERN", "bytes_to_unicode",
    "read_llama2c_bin", "read_tiktoken_ranks", "write_llama2c_bin",
]
