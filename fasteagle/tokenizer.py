"""Tokenizers: one small interface over the four formats LLaMA-family checkpoints ship with.

  type "llama2c"        llama2.c `tokenizer.bin` (pieces + scores); run.c's encoder and decoder, in Python.
                        Also how SentencePiece vocabularies from GGUF files are stored.
  type "sentencepiece"  a SentencePiece `tokenizer.model` (the `sentencepiece` library).
  type "hf"             a Hugging Face `tokenizer.json` (the `tokenizers` library). Also how byte-level BPE
                        vocabularies from GGUF files are stored.
  type "tiktoken"       Llama-3's `tokenizer.model` (base64 token + rank per line; the `tiktoken` library).

Encoding uses each format's own library (or run.c's algorithm for llama2c). Decoding is done here, the same
way for every type: each id maps to the bytes it contributes, plus SentencePiece's rule that the first
piece's leading space is dropped. Decoding that way is what lets the streaming decoder emit text as soon as
it is complete while guaranteeing `"".join(pushes) + flush() == decode(ids)`: both run the same per-token
state machine, and the stream decodes UTF-8 incrementally (a multibyte character split over several
byte-fallback or byte-level tokens is held back until its last byte arrives).

Chat templates are plain functions (not Jinja): a template renders messages into text segments and special
tokens; text segments are encoded with the tokenizer, special tokens map to their ids directly, so a
SentencePiece vocabulary (which cannot parse "<s>" out of text) gets the same ids as one that can.

Checkpoint config entries (written by the export_* functions, read by load_tokenizer):
  {"tokenizer": {"type", "file", ...type-specific extras}, "bos_token_id", "eos_token_ids", "add_bos",
   "chat_template": "llama-2" | "vicuna" | "llama-3" | "chatml" | None}
"""
import base64
import codecs
import heapq
import json
import re
import shutil
import struct
from functools import cached_property
from pathlib import Path

from fasteagle.errors import FastEagleError

CHAT_TEMPLATES = ("llama-2", "vicuna", "llama-3", "chatml")

# How a token id decodes (see _Renderer).
NORMAL = 0  # a text piece; SentencePiece-style vocabularies may drop its leading space at the start
SPECIAL = 1  # a control/special token (<s>, <|eot_id|>): invisible unless skip_special=False
RAW = 2  # raw bytes (byte-fallback <0xNN>, the unknown token's surface): never space-stripped

UNK_SURFACE = " \u2047 ".encode()  # what SentencePiece prints for <unk>
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

# Llama-3 / 3.1 (Meta's tokenizer.py): 256 special tokens after the 128000 BPE ranks; ids 128000 (begin),
# 128001 (end), 128006/128007 (header), 128009 (eot) are the same in both versions.
_LLAMA3_NAMED = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA3_NAMED))]
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp's `tokenizer.ggml.pre` names -> how that vocabulary splits text before BPE (llama-vocab.cpp).
_GGUF_PRE_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"}
_GGUF_PRE_QWEN2 = {"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"}
_GGUF_PRE_DIGITS = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"}

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


# ----------------------------------------------------------------------------------------------------------
# chat templates


class Special(str):
    """A special token inside a rendered chat (its text is the token's content, e.g. "<|im_start|>")."""


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise FastEagleError(
            f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise FastEagleError(f"bad chat message {m!r}: expected a dict with string 'role' and 'content'")
    return list(messages)


def _alternating(msgs, template):
    for i, m in enumerate(msgs):
        want = ("user", "assistant")[i % 2]
        if m["role"] != want:
            raise FastEagleError(
                f"the {template} chat template needs an optional system message, then user/assistant turns "
                f"alternating from user; message {i} has role {m['role']!r}"
            )


def render_chat(template: str, messages, add_generation_prompt: bool = True, default_system: str | None = None):
    """Render messages into a list of text (str) and special-token (Special) segments; "".join() gives the
    prompt as text. Formats follow each model's reference: Meta's llama chat_completion for llama-2, FastChat's
    vicuna_v1.1, the Llama-3-Instruct Jinja template, and ChatML as SmolLM2/Qwen2 write it."""
    msgs = _check_messages(messages)
    out: list[str] = []
    if template == "llama-2":
        if msgs and msgs[0]["role"] == "system":
            if len(msgs) < 2:
                raise FastEagleError("the llama-2 chat template needs a user message after the system message")
            sys_, first = msgs[0]["content"], msgs[1]
            msgs = [{"role": first["role"], "content": f"<<SYS>>\n{sys_}\n<</SYS>>\n\n{first['content']}"}] + msgs[2:]
        _alternating(msgs, template)
        for i in range(0, len(msgs), 2):
            user = msgs[i]["content"].strip()
            if i + 1 < len(msgs):
                out += [Special("<s>"), f"[INST] {user} [/INST] {msgs[i + 1]['content'].strip()} ", Special("</s>")]
            else:
                out += [Special("<s>"), f"[INST] {user} [/INST]"]
    elif template == "vicuna":
        system = VICUNA_SYSTEM
        if msgs and msgs[0]["role"] == "system":
            system, msgs = msgs[0]["content"], msgs[1:]
        _alternating(msgs, template)
        out += [Special("<s>"), system + " "]
        for m in msgs:
            if m["role"] == "user":
                out.append(f"USER: {m['content']} ")
            else:
                out += [f"ASSISTANT: {m['content']}", Special("</s>")]
        if add_generation_prompt:
            out.append("ASSISTANT:")
    elif template == "llama-3":
        out.append(Special("<|begin_of_text|>"))
        for m in msgs:
            out += [Special("<|start_header_id|>"), m["role"], Special("<|end_header_id|>"),
                    "\n\n" + m["content"].strip(), Special("<|eot_id|>")]
        if add_generation_prompt:
            out += [Special("<|start_header_id|>"), "assistant", Special("<|end_header_id|>"), "\n\n"]
    elif template == "chatml":
        if msgs and msgs[0]["role"] != "system" and default_system is not None:
            msgs = [{"role": "system", "content": default_system}] + msgs
        for m in msgs:
            out += [Special("<|im_start|>"), f"{m['role']}\n{m['content']}", Special("<|im_end|>"), "\n"]
        if add_generation_prompt:
            out += [Special("<|im_start|>"), "assistant\n"]
    else:
        raise FastEagleError(f"unknown chat template {template!r} (known: {', '.join(CHAT_TEMPLATES)})")
    # Adjacent text segments are encoded as one string, as the reference tokenizes the whole prompt.
    merged: list[str] = []
    for s in out:
        if merged and not isinstance(s, Special) and not isinstance(merged[-1], Special):
            merged[-1] += s
        elif s != "" or isinstance(s, Special):
            merged.append(s)
    return merged


def detect_chat_template(jinja) -> str | None:
    """Name of the template a Jinja chat_template implements (by its marker tokens), or None."""
    if not isinstance(jinja, str) or not jinja:
        return None
    if "<|im_start|>" in jinja:
        return "chatml"
    if "<|start_header_id|>" in jinja:
        return "llama-3"
    if "[INST]" in jinja:
        return "llama-2"
    if "USER:" in jinja and "ASSISTANT:" in jinja:
        return "vicuna"
    return None


def _default_system(jinja) -> str | None:
    """A ChatML template's built-in system message (SmolLM2: "You are a helpful AI assistant named SmolLM...")."""
    if not isinstance(jinja, str):
        return None
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]+?)<\|im_end\|>", jinja)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------------------------------------
# decoding: ids -> bytes, shared by decode() and the streaming decoder


class _Renderer:
    """Per-sequence decoding state. Space rules:
      "sentencepiece": drop the leading space of the first text piece (what SentencePiece's decoder does: a
                       flag set at the start, cleared once anything is output or a space has been dropped;
                       control tokens leave it set).
      "llama2c":       the above, and also drop it from a piece right after BOS (run.c's decode()).
    """

    __slots__ = ("pieces", "kinds", "rule", "bos", "skip", "at_start", "prev")

    def __init__(self, tok, skip_special: bool):
        self.pieces, self.kinds = tok._tables
        self.rule, self.bos, self.skip = tok._space_rule, tok.bos_id, skip_special
        self.at_start, self.prev = True, None

    def bytes_of(self, token_id) -> bytes:
        i = int(token_id)
        if not 0 <= i < len(self.pieces):
            raise FastEagleError(f"token id {i} is out of range for this tokenizer (vocab size {len(self.pieces)})")
        kind, prev = self.kinds[i], self.prev
        self.prev = i
        if kind == SPECIAL and self.skip:
            return b""
        b = self.pieces[i]
        if (self.rule and kind == NORMAL and b[:1] == b" "
                and (self.at_start or (self.rule == "llama2c" and prev is not None and prev == self.bos))):
            b = b[1:]
            self.at_start = False
        if b:
            self.at_start = False
        return b


class StreamDecoder:
    """Incremental detokenizer: push(id) returns the text completed by that token (possibly ""), flush()
    returns what is left (an unfinished UTF-8 sequence becomes U+FFFD, as in decode())."""

    def __init__(self, tok, prefix_ids=(), skip_special: bool = True):
        self._r = _Renderer(tok, skip_special)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        for i in prefix_ids:  # context already shown (e.g. the prompt): sets the space state, emits nothing
            self._utf8.decode(self._r.bytes_of(i))

    def push(self, token_id) -> str:
        return self._utf8.decode(self._r.bytes_of(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# ----------------------------------------------------------------------------------------------------------
# the common interface


class Tokenizer:
    """Backends implement _encode_text, id_to_piece, vocab_size, _build_tables and _special_ids."""

    type = "?"
    _space_rule: str | None = None

    def __init__(self, cfg: dict):
        self.bos_id = cfg.get("bos_token_id")
        eos = cfg.get("eos_token_ids", [])
        self.eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self.add_bos = bool(cfg.get("add_bos", False))
        self.chat_template = cfg.get("chat_template")
        self.default_system = (cfg.get("tokenizer") or {}).get("default_system")

    def _check_ids(self, where):
        n = self.vocab_size
        bos = [] if self.bos_id is None else [self.bos_id]
        for name, ids in (("bos_token_id", bos), ("eos_token_ids", self.eos_ids)):
            for i in ids:
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
                    raise FastEagleError(f"{where}: {name} {i!r} is not a token id of this tokenizer (vocab size {n})")
        if self.add_bos and self.bos_id is None:
            raise FastEagleError(f"{where}: add_bos is true but there is no bos_token_id")

    # -- encoding
    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise FastEagleError(f"can only encode text (str), got {type(text).__name__}")
        if bos is None:
            bos = self.add_bos
        if bos and self.bos_id is None:
            raise FastEagleError("this tokenizer has no BOS token")
        ids = self._encode_text(text)
        return [self.bos_id] + ids if bos else ids

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        if self.chat_template is None:
            raise FastEagleError(
                "this checkpoint's tokenizer has no chat template; use a plain prompt or name one "
                f"({', '.join(CHAT_TEMPLATES)})"
            )
        ids: list[int] = []
        for seg in render_chat(self.chat_template, messages, add_generation_prompt, self.default_system):
            ids += [self.special_id(seg)] if isinstance(seg, Special) else self.encode(seg, bos=False)
        return ids

    def special_id(self, name: str) -> int:
        """Id of a special token by its content ("<s>", "<|im_end|>")."""
        i = self._special_ids.get(name)
        if i is None:
            raise FastEagleError(
                f"chat template {self.chat_template!r} needs the special token {name!r}, which this tokenizer lacks"
            )
        return i

    # -- decoding
    @cached_property
    def _tables(self) -> tuple[list[bytes], bytes]:
        pieces, kinds = self._build_tables()
        return pieces, bytes(kinds)

    def decode(self, ids, skip_special: bool = True) -> str:
        r = _Renderer(self, skip_special)
        return b"".join([r.bytes_of(i) for i in ids]).decode("utf-8", "replace")

    def stream(self, prefix_ids=(), skip_special: bool = True) -> StreamDecoder:
        """prefix_ids: tokens already shown (e.g. a plain-text prompt), so that the first streamed piece keeps its
        leading space exactly as decode(prefix_ids + ids) would; empty for a fresh reply."""
        return StreamDecoder(self, prefix_ids, skip_special)

    def is_special(self, token_id: int) -> bool:
        return self._tables[1][token_id] == SPECIAL

    def __repr__(self):
        return (f"<{type(self).__name__} vocab={self.vocab_size} bos={self.bos_id} eos={self.eos_ids} "
                f"chat={self.chat_template}>")


# ----------------------------------------------------------------------------------------------------------
# llama2.c tokenizer.bin


def read_llama2c_bin(path) -> tuple[list[bytes], list[float]]:
    """tokenizer.bin: int32 max_token_length, then per token: float32 score, int32 length, bytes."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FastEagleError(f"{path}: cannot read tokenizer file ({e.strerror})") from None
    pieces, scores, off = [], [], 4
    try:
        (max_len,) = struct.unpack_from("<i", data, 0)
        while off < len(data):
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or n > max_len or off + n > len(data):
                raise ValueError(f"token {len(pieces)} has length {n}")
            pieces.append(data[off:off + n])
            scores.append(score)
            off += n
    except (struct.error, ValueError) as e:
        raise FastEagleError(f"{path}: not a llama2.c tokenizer.bin (truncated or corrupt: {e})") from None
    if not pieces:
        raise FastEagleError(f"{path}: not a llama2.c tokenizer.bin (no tokens)")
    return pieces, scores


def write_llama2c_bin(path, pieces: list[bytes], scores: list[float]):
    out = [struct.pack("<i", max((len(p) for p in pieces), default=0))]
    for p, s in zip(pieces, scores):
        out.append(struct.pack("<fi", s, len(p)) + p)
    Path(path).write_bytes(b"".join(out))


class Llama2cTokenizer(Tokenizer):
    """run.c's tokenizer: prepend a space (SentencePiece's dummy prefix), split into characters (unknown ones
    into <0xNN> byte tokens), then repeatedly merge the adjacent pair whose concatenation is the
    best-scoring vocabulary piece (leftmost on ties). A heap makes that O(n log n) instead of run.c's O(n^2),
    with the same result.

    Extras (GGUF SentencePiece vocabularies; llama2.c's own files use the defaults): unk_id (0), control_ids
    ([1, 2]), user_defined_ids ([]: pieces matched whole in the text, like llama.cpp), add_dummy_prefix (true).
    """

    type = "llama2c"
    _space_rule = "llama2c"

    def __init__(self, path, cfg):
        super().__init__(cfg)
        t = cfg.get("tokenizer") or {}
        self._pieces, self._scores = read_llama2c_bin(path)
        n = len(self._pieces)
        self.unk_id = t.get("unk_id", 0)
        self._control = set(t.get("control_ids", [1, 2]))
        user = t.get("user_defined_ids", [])
        self._dummy_prefix = t.get("add_dummy_prefix", True)
        if not self._dummy_prefix:  # no space was added when encoding, so none is removed when decoding
            self._space_rule = None
        for i in [self.unk_id, *self._control, *user]:
            if i is not None and not 0 <= i < n:
                raise FastEagleError(f"{path}: tokenizer config names token id {i}, but the file has {n} tokens")
        self._lookup: dict[str, int] = {}  # mergeable text pieces
        self._byte_ids: dict[int, int] = {}
        for i, p in enumerate(self._pieces):
            s = p.decode("utf-8", "surrogateescape")
            m = _BYTE_PIECE.match(s)
            if m:
                self._byte_ids.setdefault(int(m.group(1), 16), i)
            elif i != self.unk_id and i not in self._control:
                self._lookup.setdefault(s, i)
        self._special_ids = {self._pieces[i].decode("utf-8", "replace").strip(): i for i in sorted(self._control)}
        self._user = {self._pieces[i].decode("utf-8", "surrogateescape"): i for i in user}
        self._user_re = (re.compile("|".join(re.escape(u) for u in sorted(self._user, key=len, reverse=True)))
                         if self._user else None)
        self._check_ids(path)

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def id_to_piece(self, i: int) -> str:
        return self._pieces[i].decode("utf-8", "replace")

    def _build_tables(self):
        pieces, kinds = [], []
        for i, p in enumerate(self._pieces):
            m = _BYTE_PIECE.match(p.decode("utf-8", "replace"))
            if i in self._control:
                pieces.append(p.strip())  # llama2.c writes BOS/EOS as "\n<s>\n"
                kinds.append(SPECIAL)
            elif i == self.unk_id:
                pieces.append(UNK_SURFACE)
                kinds.append(RAW)
            elif m:
                pieces.append(bytes([int(m.group(1), 16)]))
                kinds.append(RAW)
            else:
                pieces.append(p)
                kinds.append(NORMAL)
        return pieces, kinds

    def _encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        # SentencePiece writes spaces as "▁" internally, so a literal "▁" in the text is a space to it too.
        text = text.replace("\u2581", " ")
        if self._dummy_prefix:
            text = " " + text
        if self._user_re is None:
            return self._bpe(text)
        ids, pos = [], 0
        for m in self._user_re.finditer(text):
            ids += self._bpe(text[pos:m.start()])
            ids.append(self._user[m.group(0)])
            pos = m.end()
        return ids + self._bpe(text[pos:])

    def _bpe(self, text: str) -> list[int]:
        lookup, scores = self._lookup, self._scores
        syms: list = []  # str: mergeable piece; int: a fixed id (byte fallback), never merged
        for ch in text:
            if ch in lookup:
                syms.append(ch)
            elif self._byte_ids:  # byte fallback
                syms += [self._byte_ids.get(b, self.unk_id) for b in ch.encode("utf-8")]
            else:
                syms.append(self.unk_id)
            if syms[-1] is None:
                raise FastEagleError(f"cannot encode {ch!r}: not in the vocabulary, which has no byte/unknown tokens")
        n = len(syms)
        nxt, prv, alive = list(range(1, n)) + [-1], list(range(-1, n - 1)), [True] * n

        def pair(i, j):  # heap entry for merging symbols i and j, or None; ties go to the leftmost pair
            a, b = syms[i], syms[j]
            if type(a) is str and type(b) is str and (k := lookup.get(a + b)) is not None:
                return (-scores[k], i, a + b)
            return None

        heap = [e for i in range(n - 1) if (e := pair(i, i + 1)) is not None]
        heapq.heapify(heap)
        while heap:
            _, i, merged = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j < 0 or type(syms[j]) is not str or syms[i] + syms[j] != merged:
                continue  # stale: one side has merged since this pair was queued
            syms[i] = merged
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            for e in (pair(prv[i], i) if prv[i] >= 0 else None, pair(i, nxt[i]) if nxt[i] >= 0 else None):
                if e is not None:
                    heapq.heappush(heap, e)
        return [lookup[s] if type(s) is str else s for s, a in zip(syms, alive) if a]


# ----------------------------------------------------------------------------------------------------------
# SentencePiece tokenizer.model


class SentencePieceTokenizer(Tokenizer):
    type = "sentencepiece"

    def __init__(self, path, cfg):
        super().__init__(cfg)
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise FastEagleError(f"{path}: cannot load SentencePiece model ({e})") from None
        sp = self._sp
        # The decoder drops the first leading space only when the model adds a dummy prefix when encoding.
        first = sp.encode("a", out_type=str)
        self._space_rule = "sentencepiece" if first and first[0].startswith("\u2581") else None
        self._special_ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
        self._check_ids(path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def _encode_text(self, text):
        return self._sp.encode(text)

    def _build_tables(self):
        sp, pieces, kinds = self._sp, [], []
        for i in range(sp.get_piece_size()):
            p = sp.id_to_piece(i)
            if sp.is_control(i):
                pieces.append(p.encode())
                kinds.append(SPECIAL)
            elif sp.is_byte(i):
                pieces.append(bytes([int(_BYTE_PIECE.match(p).group(1), 16)]))
                kinds.append(RAW)
            elif sp.is_unknown(i):
                pieces.append(UNK_SURFACE)
                kinds.append(RAW)
            else:
                pieces.append(p.replace("\u2581", " ").encode())
                kinds.append(NORMAL)
        return pieces, kinds


# ----------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies ("Ġ" is the space byte)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _decoder_types(dec) -> list[dict]:
    if not dec:
        return []
    if dec.get("type") == "Sequence":
        return [d for sub in dec.get("decoders", []) for d in _decoder_types(sub)]
    return [dec]


class HFTokenizer(Tokenizer):
    type = "hf"

    def __init__(self, path, cfg):
        super().__init__(cfg)
        from tokenizers import Tokenizer as _HF

        try:
            self._json = json.loads(Path(path).read_text(encoding="utf-8"))
            self._tok = _HF.from_file(str(path))
            self._tok.no_truncation()  # some tokenizer.json files carry truncation/padding settings
            self._tok.no_padding()
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise FastEagleError(f"{path}: cannot load tokenizer.json ({e})") from None
        self._added = {a["id"]: a for a in self._json.get("added_tokens", [])}
        self._special_ids = {a["content"]: i for i, a in self._added.items()}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        decs = _decoder_types(self._json.get("decoder"))
        kinds = {d.get("type") for d in decs}
        if "ByteLevel" in kinds:
            self._style = "bytelevel"
        elif "Metaspace" in kinds or any(
            d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == "\u2581" for d in decs
        ):
            self._style = "metaspace"
            self._byte_fallback = "ByteFallback" in kinds or bool((self._json.get("model") or {}).get("byte_fallback"))
            # The first space goes either by a Strip decoder (after Fuse: the output's first character; we
            # strip it from the first text piece as SentencePiece does, which differs only when the output
            # starts with a <0x20> byte token) or by Metaspace (the first token's), unless it never prepends one.
            strip = any(d.get("type") == "Strip" and d.get("start", 0) >= 1 for d in decs) or any(
                d.get("type") == "Metaspace"
                and d.get("prepend_scheme", "always" if d.get("add_prefix_space", True) else "never") != "never"
                for d in decs
            )
            self._space_rule = "sentencepiece" if strip else None
        else:
            self._style = "other"  # decode token by token with the library (no cross-token rules)
        self._check_ids(path)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(i)

    def _encode_text(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def _build_tables(self):
        pieces, kinds = [], []
        if self._style == "bytelevel":
            byte_of = {c: b for b, c in bytes_to_unicode().items()}
        for i in range(self._vocab_size):
            t = self._tok.id_to_token(i)
            added = self._added.get(i)
            if t is None:
                pieces.append(b"")
                kinds.append(RAW)
                continue
            kinds.append(SPECIAL if added is not None and added.get("special") else NORMAL)
            if self._style == "bytelevel":
                # As the ByteLevel decoder does: map each character back to its byte; a token with a
                # character outside the map (an added token such as "你好") contributes its own UTF-8.
                try:
                    pieces.append(bytes(byte_of[c] for c in t))
                except KeyError:
                    pieces.append(t.encode())
            elif self._style == "metaspace":
                m = _BYTE_PIECE.match(t) if self._byte_fallback else None
                if m:
                    pieces.append(bytes([int(m.group(1), 16)]))
                    kinds[-1] = RAW
                else:
                    pieces.append(t.replace("\u2581", " ").encode())
            else:
                pieces.append(self._tok.decode([i], skip_special_tokens=False).encode())
        return pieces, kinds


# ----------------------------------------------------------------------------------------------------------
# tiktoken (Llama-3)


def read_tiktoken_ranks(path) -> dict[bytes, int]:
    ranks = {}
    try:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
    except OSError as e:
        raise FastEagleError(f"{path}: cannot read tokenizer file ({e.strerror})") from None
    except ValueError:
        raise FastEagleError(f"{path}: line {n} is not '<base64 token> <rank>' (not a tiktoken BPE file)") from None
    if not ranks:
        raise FastEagleError(f"{path}: empty tiktoken BPE file")
    return ranks


def _looks_like_tiktoken(path) -> bool:
    try:
        with open(path, "rb") as f:
            first = f.readline(4096).split()
        return len(first) == 2 and bool(base64.b64decode(first[0], validate=True)) and first[1].isdigit()
    except (OSError, ValueError):
        return False


class TiktokenTokenizer(Tokenizer):
    """Extras: pattern (split regex; default Llama-3's), special_tokens ("llama-3": Llama-3.1's 256 names after
    the last rank, or an explicit {content: id} dict)."""

    type = "tiktoken"

    def __init__(self, path, cfg):
        super().__init__(cfg)
        import tiktoken

        t = cfg.get("tokenizer") or {}
        ranks = read_tiktoken_ranks(path)
        special = t.get("special_tokens", "llama-3")
        if special == "llama-3":
            special = {s: len(ranks) + k for k, s in enumerate(LLAMA3_SPECIAL_TOKENS)}
        elif not isinstance(special, dict):
            raise FastEagleError(f"{path}: tokenizer special_tokens must be 'llama-3' or a dict, got {special!r}")
        self._ranks, self._special_ids = ranks, dict(special)
        try:
            self._enc = tiktoken.Encoding(
                name=Path(path).name, pat_str=t.get("pattern", LLAMA3_PATTERN), mergeable_ranks=ranks,
                special_tokens=self._special_ids,
            )
        except ValueError as e:
            raise FastEagleError(f"{path}: bad tiktoken tokenizer ({e})") from None
        self._vocab_size = max([*ranks.values(), *self._special_ids.values()]) + 1
        self._check_ids(path)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def id_to_piece(self, i: int) -> str:
        return self._tables[0][i].decode("utf-8", "replace")

    def _encode_text(self, text):
        # Special tokens written in the text are parsed, as the `tokenizers` library does for tokenizer.json.
        return self._enc.encode(text, allowed_special="all")

    def _build_tables(self):
        pieces, kinds = [b""] * self._vocab_size, [RAW] * self._vocab_size
        for b, r in self._ranks.items():
            pieces[r], kinds[r] = b, NORMAL
        for s, r in self._special_ids.items():
            pieces[r], kinds[r] = s.encode(), SPECIAL
        return pieces, kinds


# ----------------------------------------------------------------------------------------------------------
# loading


_BACKENDS = {"llama2c": Llama2cTokenizer, "sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer,
             "tiktoken": TiktokenTokenizer}


def load_tokenizer(ckpt_dir, cfg: dict | None = None) -> Tokenizer:
    """Load the tokenizer a checkpoint's config.json describes (cfg: that config, if already read)."""
    ckpt_dir = Path(ckpt_dir)
    if cfg is None:
        path = ckpt_dir / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except OSError as e:
            raise FastEagleError(f"{path}: cannot read ({e.strerror})") from None
        except ValueError as e:
            raise FastEagleError(f"{path}: not valid JSON ({e})") from None
    t = cfg.get("tokenizer")
    if not isinstance(t, dict) or "type" not in t or "file" not in t:
        raise FastEagleError(f"{ckpt_dir}: config has no tokenizer entry (a draft checkpoint? use the target's)")
    backend = _BACKENDS.get(t["type"])
    if backend is None:
        raise FastEagleError(f"{ckpt_dir}: unknown tokenizer type {t['type']!r} (known: {', '.join(_BACKENDS)})")
    path = ckpt_dir / t["file"]
    if not path.is_file():
        raise FastEagleError(f"{path}: tokenizer file missing")
    tok = backend(path, cfg)
    if tok.chat_template is not None and tok.chat_template not in CHAT_TEMPLATES:
        raise FastEagleError(
            f"{ckpt_dir}: unknown chat template {tok.chat_template!r} (known: {', '.join(CHAT_TEMPLATES)})"
        )
    return tok


def _entries(tok_cfg, bos, eos, add_bos, chat) -> dict:
    eos_ids = []
    for e in eos:
        if e is not None and int(e) not in eos_ids:
            eos_ids.append(int(e))
    return {"tokenizer": tok_cfg, "bos_token_id": None if bos is None else int(bos), "eos_token_ids": eos_ids,
            "add_bos": bool(add_bos), "chat_template": chat}


def _finish(out_dir, entries) -> dict:
    """Load what was written (validates ids against the vocabulary) and return the config entries."""
    load_tokenizer(out_dir, entries)
    return entries


# ----------------------------------------------------------------------------------------------------------
# export: llama2.c


def export_tokenizer_llama2c(tokenizer_bin, out_dir) -> dict:
    """Copy a llama2.c tokenizer.bin (ids 0/1/2 = <unk>/<s>/</s> by llama2.c's convention)."""
    tokenizer_bin = Path(tokenizer_bin)
    read_llama2c_bin(tokenizer_bin)  # validate before copying
    shutil.copyfile(tokenizer_bin, Path(out_dir) / "tokenizer.bin")
    return _finish(out_dir, _entries({"type": "llama2c", "file": "tokenizer.bin"}, 1, [2], True, None))


# ----------------------------------------------------------------------------------------------------------
# export: Hugging Face model directory


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise FastEagleError(f"{path}: not valid JSON ({e})") from None
    return d if isinstance(d, dict) else {}


def _as_list(v) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


def _token_text(v):
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


def _hf_chat_jinja(src: Path, tc: dict):
    t = tc.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    if not t and (src / "chat_template.jinja").is_file():
        t = (src / "chat_template.jinja").read_text(encoding="utf-8")
    if not t:
        t = _read_json(src / "chat_template.json").get("chat_template")
    return t if isinstance(t, str) else None


def _post_processor_adds(pp, token_id) -> bool:
    """Whether a tokenizer.json post-processor inserts token_id (e.g. Llama's TemplateProcessing with <s>)."""
    if not pp:
        return False
    if pp.get("type") == "Sequence":
        return any(_post_processor_adds(p, token_id) for p in pp.get("processors", []))
    if pp.get("type") == "TemplateProcessing":
        names = [x["SpecialToken"]["id"] for x in pp.get("single", []) if "SpecialToken" in x]
        return any(token_id in (pp.get("special_tokens", {}).get(n, {}).get("ids") or []) for n in names)
    return False


def export_tokenizer_hf(src_dir, out_dir) -> dict:
    """Tokenizer of a Hugging Face model directory: tokenizer.json, else a SentencePiece tokenizer.model, else
    Llama-3's tiktoken tokenizer.model (or original/tokenizer.model). BOS/EOS from generation_config.json,
    config.json and tokenizer_config.json (EOS ids: the union, generation_config first)."""
    src, out_dir = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise FastEagleError(f"{src}: tokenizer directory not found")
    tc, gc, mc = (_read_json(src / n) for n in ("tokenizer_config.json", "generation_config.json", "config.json"))
    candidates = [src / "tokenizer.model", src / "original" / "tokenizer.model"]
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", out_dir / "tokenizer.json")
        tok_cfg = {"type": "hf", "file": "tokenizer.json"}
    elif (src / "tokenizer.model").is_file() and not _looks_like_tiktoken(src / "tokenizer.model"):
        shutil.copyfile(src / "tokenizer.model", out_dir / "tokenizer.model")
        tok_cfg = {"type": "sentencepiece", "file": "tokenizer.model"}
    elif any(p.is_file() and _looks_like_tiktoken(p) for p in candidates):
        p = next(p for p in candidates if p.is_file() and _looks_like_tiktoken(p))
        shutil.copyfile(p, out_dir / "tokenizer.tiktoken")
        tok_cfg = {"type": "tiktoken", "file": "tokenizer.tiktoken", "pattern": LLAMA3_PATTERN,
                   "special_tokens": "llama-3"}
    else:
        raise FastEagleError(f"{src}: no tokenizer found (expected tokenizer.json or tokenizer.model)")
    jinja = _hf_chat_jinja(src, tc)
    chat = detect_chat_template(jinja)
    if chat == "chatml" and _default_system(jinja):
        tok_cfg["default_system"] = _default_system(jinja)

    # Resolve token names to ids with the tokenizer just written (no BOS/EOS yet: those are what we look up).
    probe = load_tokenizer(out_dir, _entries(tok_cfg, None, [], False, None))

    def token_id(v):
        text = _token_text(v)
        if text is None:
            return None
        i = probe._special_ids.get(text)
        if i is None and probe.type == "hf":
            i = probe._tok.token_to_id(text)
        if i is None and probe.type == "sentencepiece":
            i = probe._sp.piece_to_id(text)
            i = None if i == probe._sp.unk_id() and text != probe._sp.id_to_piece(i) else i
        return i

    bos = gc.get("bos_token_id", mc.get("bos_token_id"))
    if bos is None:
        bos = token_id(tc.get("bos_token"))
    eos = _as_list(gc.get("eos_token_id")) + _as_list(mc.get("eos_token_id")) + [token_id(tc.get("eos_token"))]
    if probe.type == "sentencepiece":
        sp = probe._sp
        bos = sp.bos_id() if bos is None and sp.bos_id() >= 0 else bos
        eos += [sp.eos_id()] if sp.eos_id() >= 0 else []
    if probe.type == "tiktoken":
        bos = probe._special_ids["<|begin_of_text|>"] if bos is None else bos
        eos += [probe._special_ids["<|end_of_text|>"], probe._special_ids["<|eot_id|>"]]
    if isinstance(tc.get("add_bos_token"), bool):
        add_bos = tc["add_bos_token"]
    elif probe.type == "hf":
        add_bos = bos is not None and _post_processor_adds(probe._json.get("post_processor"), bos)
    else:
        add_bos = probe.type in ("sentencepiece", "tiktoken")  # LlamaTokenizer's and Meta's Llama-3 default
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    return _finish(out_dir, _entries(tok_cfg, bos, eos, add_bos and bos is not None, chat))


# ----------------------------------------------------------------------------------------------------------
# export: GGUF metadata

# llama.cpp token types
_GGUF_NORMAL, _GGUF_UNKNOWN, _GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_UNUSED, _GGUF_BYTE = 1, 2, 3, 4, 5, 6


def _gguf_metadata(gguf_path) -> dict:
    """Tokenizer metadata as Python values (strings of string arrays kept as bytes), read through the reader's
    parts/data fields, which every gguf-py version has. gguf_path may also be an open gguf.GGUFReader (parsing
    a GGUF's metadata takes seconds, so a converter that already has one can pass it)."""
    import gguf
    import numpy as np

    if hasattr(gguf_path, "fields"):
        reader = gguf_path
    else:
        try:
            reader = gguf.GGUFReader(str(gguf_path))
        except (OSError, ValueError) as e:
            raise FastEagleError(f"{gguf_path}: cannot read GGUF file ({e})") from None
    out = {}
    for key, f in reader.fields.items():
        if not (key.startswith("tokenizer.") or key == "general.architecture") or not f.types:
            continue
        t0 = f.types[0]
        if t0 == gguf.GGUFValueType.ARRAY:
            if f.types[-1] == gguf.GGUFValueType.STRING:
                out[key] = [bytes(f.parts[i]) for i in f.data]
            else:
                out[key] = np.concatenate([f.parts[i] for i in f.data]).tolist() if f.data else []
        elif t0 == gguf.GGUFValueType.STRING:
            out[key] = bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
        else:
            out[key] = f.parts[f.data[0]].tolist()[0]
    return out


def _gguf_bpe_json(tokens: list[str], types: list[int], merges: list[str], pre: str | None) -> str:
    """A tokenizer.json for a GGUF byte-level BPE vocabulary (llama.cpp's "gpt2" model)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _HF

    spelled = bytes_to_unicode()
    alphabet = set(spelled.values())
    vocab = {}
    for i, t in enumerate(tokens):
        if types[i] not in (_GGUF_CONTROL, _GGUF_USER_DEFINED) and not set(t) <= alphabet:
            t = "".join(spelled[b] for b in t.encode())  # a vocabulary entry written as plain text
        vocab.setdefault(t, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    llama3_like = pre in _GGUF_PRE_LLAMA3
    try:
        model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=llama3_like)
    except TypeError:  # tokenizers < 0.19 has no ignore_merges
        model = models.BPE(vocab=vocab, merges=pairs)
    tok = _HF(model)
    if pre in _GGUF_PRE_DIGITS:  # "\p{N}" then the GPT-2 regex
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    elif llama3_like or pre in _GGUF_PRE_QWEN2:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_PATTERN if llama3_like else QWEN2_PATTERN), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:  # "gpt2", "default" and anything else: GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) are special; user-defined ones are matched whole but are ordinary text.
    typed = list(zip(tokens, types))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in typed if ty == _GGUF_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in typed if ty == _GGUF_USER_DEFINED])
    d = json.loads(tok.to_str())
    # Merges as "a b" strings: the format every tokenizers version reads (byte-level pieces have no spaces).
    d["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in d["model"].get("merges", [])]
    return json.dumps(d, ensure_ascii=False)


def export_tokenizer_gguf(gguf_path, out_dir) -> dict:
    """Tokenizer from a GGUF file's metadata (gguf_path: a path, or an open gguf.GGUFReader): "gpt2" (byte-level
    BPE) -> tokenizer.json; "llama" (SentencePiece style: pieces + scores + token types) -> a llama2.c
    tokenizer.bin with the extras Llama2cTokenizer reads. BOS/EOS/add_bos come from the metadata, which is
    trusted over any other source (SmolLM2's end of turn <|im_end|> is its eos_token_id)."""
    md = _gguf_metadata(gguf_path)
    gguf_path = "GGUF file" if hasattr(gguf_path, "fields") else gguf_path  # for messages
    out_dir = Path(out_dir)
    model = md.get("tokenizer.ggml.model")
    raw = md.get("tokenizer.ggml.tokens")
    if model is None or raw is None:
        raise FastEagleError(f"{gguf_path}: no tokenizer metadata in the GGUF file (pass an HF tokenizer directory)")
    n = len(raw)
    types = md.get("tokenizer.ggml.token_type") or [_GGUF_NORMAL] * n
    if len(types) != n:
        raise FastEagleError(f"{gguf_path}: {len(types)} token types for {n} tokens")
    jinja = md.get("tokenizer.chat_template")
    chat = detect_chat_template(jinja)
    bos = md.get("tokenizer.ggml.bos_token_id")
    # eos first, then end-of-turn / end-of-message ids where the file has them (Llama-3: <|eot_id|>).
    eos = [md.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    if model == "gpt2":
        tokens = [t.decode("utf-8", "replace") for t in raw]
        merges = [m.decode("utf-8", "replace") for m in md.get("tokenizer.ggml.merges", [])]
        tok_json = _gguf_bpe_json(tokens, types, merges, md.get("tokenizer.ggml.pre"))
        (out_dir / "tokenizer.json").write_text(tok_json, encoding="utf-8")
        tok_cfg = {"type": "hf", "file": "tokenizer.json"}
        add_bos = md.get("tokenizer.ggml.add_bos_token", False)
    elif model == "llama":
        scores = md.get("tokenizer.ggml.scores") or [0.0] * n
        pieces = [t if ty in (_GGUF_CONTROL, _GGUF_UNKNOWN, _GGUF_BYTE) else t.replace("\u2581".encode(), b" ")
                  for t, ty in zip(raw, types)]
        write_llama2c_bin(out_dir / "tokenizer.bin", pieces, [float(s) for s in scores])
        unk = md.get("tokenizer.ggml.unknown_token_id",
                     next((i for i, ty in enumerate(types) if ty == _GGUF_UNKNOWN), None))
        tok_cfg = {"type": "llama2c", "file": "tokenizer.bin", "unk_id": unk,
                   "control_ids": [i for i, ty in enumerate(types) if ty == _GGUF_CONTROL],
                   "user_defined_ids": [i for i, ty in enumerate(types) if ty == _GGUF_USER_DEFINED],
                   "add_dummy_prefix": bool(md.get("tokenizer.ggml.add_space_prefix", True))}
        add_bos = md.get("tokenizer.ggml.add_bos_token", True)
        if "tokenizer.ggml.bos_token_id" not in md and "tokenizer.ggml.eos_token_id" not in md:
            bos, eos = 1, [2]  # llama.cpp's defaults for SentencePiece vocabularies
    else:
        raise FastEagleError(f"{gguf_path}: unsupported GGUF tokenizer model {model!r} (supported: gpt2, llama)")
    if chat == "chatml" and _default_system(jinja):
        tok_cfg["default_system"] = _default_system(jinja)
    return _finish(out_dir, _entries(tok_cfg, bos, eos, bool(add_bos) and bos is not None, chat))
