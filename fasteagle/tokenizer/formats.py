"""The four tokenizer types LLaMA-family checkpoints ship with, behind one interface (base.Tokenizer), and loading.

  type "llama2c"        llama2.c `tokenizer.bin` (pieces + scores); run.c's encoder and decoder, in Python.
                        Also how SentencePiece vocabularies from GGUF files are stored.
  type "sentencepiece"  a SentencePiece `tokenizer.model` (the `sentencepiece` library).
  type "hf"             a Hugging Face `tokenizer.json` (the `tokenizers` library). Also how byte-level BPE
                        vocabularies from GGUF files are stored.
  type "tiktoken"       Llama-3's `tokenizer.model` (base64 token + rank per line; the `tiktoken` library).

Encoding uses each format's own library (or run.c's algorithm for llama2c). Decoding is the same for every type
(stream.py): each backend only tabulates the bytes each id contributes and how it decodes (_build_tables).
"""
import base64
import heapq
import json
import re
import struct
from pathlib import Path

from fasteagle.errors import FastEagleError
from fasteagle.tokenizer.base import Tokenizer
from fasteagle.tokenizer.chat import CHAT_TEMPLATES
from fasteagle.tokenizer.stream import NORMAL, RAW, SPECIAL

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
    _parses_specials = True  # added tokens, with their own whitespace rules (lstrip, rstrip)

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


def looks_like_tiktoken(path) -> bool:
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
    _parses_specials = True  # allowed_special="all" (below)

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

