"""The interface every tokenizer type (formats.py) implements: encode, encode_chat, decode, stream."""
import re
from functools import cached_property

from fasteagle.errors import FastEagleError
from fasteagle.tokenizer.chat import CHAT_TEMPLATES, Special, render_chat, render_jinja
from fasteagle.tokenizer.stream import SPECIAL, Renderer, StreamDecoder


class Tokenizer:
    """Backends implement _encode_text, id_to_piece, vocab_size, _build_tables and _special_ids."""

    type = "?"
    _space_rule: str | None = None
    _parses_specials = False  # whether _encode_text itself maps special-token strings in the text to their ids

    def __init__(self, cfg: dict):
        self.bos_id = cfg.get("bos_token_id")
        eos = cfg.get("eos_token_ids", [])
        self.eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self.add_bos = bool(cfg.get("add_bos", False))
        self.chat_template_jinja = cfg.get("chat_template_jinja")  # the source model's own template, else
        self.chat_template = cfg.get("chat_template")  # the name of a hand-written one (see chat.py)
        self.bos_token, self.eos_token = cfg.get("bos_token"), cfg.get("eos_token")  # their text, for the template
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

    def special_id(self, name: str) -> int:
        """Id of a special token by its content ("<s>", "<|im_end|>")."""
        i = self._special_ids.get(name)
        if i is None:
            raise FastEagleError(
                f"chat template {self.chat_template!r} needs the special token {name!r}, which this tokenizer lacks"
            )
        return i

    # -- chat
    def render_chat_text(self, messages, add_generation_prompt: bool = True) -> str:
        """The chat prompt as text, special tokens written out: what encode_chat tokenizes."""
        if self.chat_template_jinja is None:
            return "".join(self._render_hand_written(messages, add_generation_prompt))
        return render_jinja(self.chat_template_jinja, messages, add_generation_prompt, bos_token=self.bos_token,
                            eos_token=self.eos_token)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Ids of a chat prompt. With the model's own template: the rendered text, its special-token strings mapped to
        their ids and the text between them encoded without BOS; BOS is prepended only if this tokenizer adds one and
        the template did not render it (as llama.cpp does; transformers never adds one). Else the hand-written
        template's segments."""
        if self.chat_template_jinja is not None:
            ids = self._encode_rendered(self.render_chat_text(messages, add_generation_prompt))
            return [self.bos_id] + ids if self.add_bos and ids[:1] != [self.bos_id] else ids
        ids: list[int] = []
        for seg in self._render_hand_written(messages, add_generation_prompt):
            ids += [self.special_id(seg)] if isinstance(seg, Special) else self.encode(seg, bos=False)
        return ids

    def _render_hand_written(self, messages, add_generation_prompt):
        if self.chat_template is None:
            raise FastEagleError(
                "this checkpoint's tokenizer has no chat template; use a plain prompt or name one "
                f"({', '.join(CHAT_TEMPLATES)})"
            )
        return render_chat(self.chat_template, messages, add_generation_prompt, self.default_system)

    @cached_property
    def _special_re(self) -> re.Pattern | None:
        names = sorted((s for s in self._special_ids if s), key=len, reverse=True)  # longest match first
        return re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def _encode_rendered(self, text: str) -> list[int]:
        """Ids of rendered chat text: special-token strings ("<s>", "<|im_start|>") map to their ids, the text between
        them is encoded as text. SentencePiece cannot parse "<s>" out of text, so the split is done here, unless the
        backend's library does it itself (with its own rules for the whitespace around added tokens)."""
        if self._parses_specials or self._special_re is None:
            return self._encode_text(text)
        ids: list[int] = []
        for k, part in enumerate(self._special_re.split(text)):  # text, special, text, ..., text
            ids += [self._special_ids[part]] if k % 2 else self._encode_text(part)
        return ids

    # -- decoding
    @cached_property
    def _tables(self) -> tuple[list[bytes], bytes]:
        pieces, kinds = self._build_tables()
        return pieces, bytes(kinds)

    def decode(self, ids, skip_special: bool = True) -> str:
        r = Renderer(self, skip_special)
        return b"".join([r.bytes_of(i) for i in ids]).decode("utf-8", "replace")

    def stream(self, prefix_ids=(), skip_special: bool = True) -> StreamDecoder:
        """prefix_ids: tokens already shown (e.g. a plain-text prompt), so that the first streamed piece keeps its
        leading space exactly as decode(prefix_ids + ids) would; empty for a fresh reply."""
        return StreamDecoder(self, prefix_ids, skip_special)

    def is_special(self, token_id: int) -> bool:
        return self._tables[1][token_id] == SPECIAL

    def __repr__(self):
        chat = "jinja" if self.chat_template_jinja is not None else self.chat_template
        return f"<{type(self).__name__} vocab={self.vocab_size} bos={self.bos_id} eos={self.eos_ids} chat={chat}>"
