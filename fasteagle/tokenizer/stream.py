"""Decoding ids to text, the same way for every tokenizer type, whole (Tokenizer.decode) or streamed (StreamDecoder).

Each id maps to the bytes it contributes (a backend's _build_tables), plus SentencePiece's rule that the first piece's
leading space is dropped. Decoding that way is what lets the streaming decoder emit text as soon as it is complete
while guaranteeing `"".join(pushes) + flush() == decode(ids)`: both run the same per-token state machine, and the
stream decodes UTF-8 incrementally (a multibyte character split over several byte-fallback or byte-level tokens is held
back until its last byte arrives).
"""
import codecs

from fasteagle.errors import FastEagleError

# How a token id decodes.
NORMAL = 0  # a text piece; SentencePiece-style vocabularies may drop its leading space at the start
SPECIAL = 1  # a control/special token (<s>, <|eot_id|>): invisible unless skip_special=False
RAW = 2  # raw bytes (byte-fallback <0xNN>, the unknown token's surface): never space-stripped


class Renderer:
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
        self._r = Renderer(tok, skip_special)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        for i in prefix_ids:  # context already shown (e.g. the prompt): sets the space state, emits nothing
            self._utf8.decode(self._r.bytes_of(i))

    def push(self, token_id) -> str:
        return self._utf8.decode(self._r.bytes_of(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
