"""Tokenizer files and checkpoint config entries from a model's source: a Hugging Face directory, GGUF metadata or a
llama2.c tokenizer.bin. Each export_* function writes the tokenizer file into the checkpoint directory and returns
the config entries load_tokenizer reads (see the package docstring), after loading them once to validate them.
"""
import json
import shutil
from pathlib import Path

from fasteagle.errors import FastEagleError
from fasteagle.tokenizer.formats import (LLAMA3_PATTERN, QWEN2_PATTERN, bytes_to_unicode, load_tokenizer,
                                         looks_like_tiktoken, read_llama2c_bin, write_llama2c_bin)

# llama.cpp's `tokenizer.ggml.pre` names -> how that vocabulary splits text before BPE (llama-vocab.cpp).
_GGUF_PRE_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"}
_GGUF_PRE_QWEN2 = {"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"}
_GGUF_PRE_DIGITS = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"}


def _entries(tok_cfg, bos, eos, add_bos, jinja=None, bos_text=None, eos_text=None) -> dict:
    """jinja: the model's chat template; bos_text / eos_text: what the template sees as bos_token / eos_token."""
    eos_ids = []
    for e in eos:
        if e is not None and int(e) not in eos_ids:
            eos_ids.append(int(e))
    return {"tokenizer": tok_cfg, "bos_token_id": None if bos is None else int(bos), "eos_token_ids": eos_ids,
            "add_bos": bool(add_bos), "chat_template_jinja": jinja, "bos_token": bos_text, "eos_token": eos_text}


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
    return _finish(out_dir, _entries({"type": "llama2c", "file": "tokenizer.bin"}, 1, [2], True))


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


def _hf_chat_jinja(src: Path, tc: dict) -> str | None:
    """The model's default chat template, where transformers finds it: chat_template.jinja (which takes priority),
    tokenizer_config.json's "chat_template" (a string, or [{"name", "template"}, ...] with a "default"), or a
    processor's chat_template.json."""
    if (src / "chat_template.jinja").is_file():
        return (src / "chat_template.jinja").read_text(encoding="utf-8")
    t = tc.get("chat_template") or _read_json(src / "chat_template.json").get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
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
    config.json and tokenizer_config.json (EOS ids: the union, generation_config first); the chat template and the
    bos_token / eos_token text it sees as transformers finds them."""
    src, out_dir = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise FastEagleError(f"{src}: tokenizer directory not found")
    tc, gc, mc = (_read_json(src / n) for n in ("tokenizer_config.json", "generation_config.json", "config.json"))
    candidates = [src / "tokenizer.model", src / "original" / "tokenizer.model"]
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", out_dir / "tokenizer.json")
        tok_cfg = {"type": "hf", "file": "tokenizer.json"}
    elif (src / "tokenizer.model").is_file() and not looks_like_tiktoken(src / "tokenizer.model"):
        shutil.copyfile(src / "tokenizer.model", out_dir / "tokenizer.model")
        tok_cfg = {"type": "sentencepiece", "file": "tokenizer.model"}
    elif any(p.is_file() and looks_like_tiktoken(p) for p in candidates):
        p = next(p for p in candidates if p.is_file() and looks_like_tiktoken(p))
        shutil.copyfile(p, out_dir / "tokenizer.tiktoken")
        tok_cfg = {"type": "tiktoken", "file": "tokenizer.tiktoken", "pattern": LLAMA3_PATTERN,
                   "special_tokens": "llama-3"}
    else:
        raise FastEagleError(f"{src}: no tokenizer found (expected tokenizer.json or tokenizer.model)")

    # Resolve token names to ids with the tokenizer just written (no BOS/EOS yet: those are what we look up).
    probe = load_tokenizer(out_dir, _entries(tok_cfg, None, [], False))

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
    return _finish(out_dir, _entries(tok_cfg, bos, eos, add_bos and bos is not None, _hf_chat_jinja(src, tc),
                                     _token_text(tc.get("bos_token")), _token_text(tc.get("eos_token"))))


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
    trusted over any other source (SmolLM2's end of turn <|im_end|> is its eos_token_id), and so is the chat template
    (tokenizer.chat_template)."""
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

    def text(i):  # a token's text: what llama.cpp gives a chat template as bos_token / eos_token
        return raw[i].decode("utf-8", "replace") if isinstance(i, int) and 0 <= i < n else None

    return _finish(out_dir, _entries(tok_cfg, bos, eos, bool(add_bos) and bos is not None,
                                     md.get("tokenizer.chat_template"), text(bos), text(eos[0])))
