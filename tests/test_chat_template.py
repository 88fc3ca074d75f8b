"""Chat templates from the checkpoint: the source model's Jinja template, exported from an HF directory or GGUF file and
rendered as transformers renders it, gives the ids of transformers' apply_chat_template(..., tokenize=True) for every
tokenizer type (byte-level BPE, SentencePiece, tiktoken), single- and multi-turn, with and without a system message;
a template's own errors are one-line FastEagleErrors; the hand-written templates (checkpoints converted before
templates were stored) render the same ids where they implement the same template."""
import json
from datetime import datetime

import pytest

from conftest import CHAT_TEMPLATE, save_hf_tokenizer
from fasteagle import tokenizer as T
from fasteagle.errors import FastEagleError
from test_tokenizer import SMOL_JINJA, bpe_gguf, llama3_style_json, tiktoken_dir, train_sp, write_gguf

transformers = pytest.importorskip("transformers")

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello! How can I help? "},
         {"role": "user", "content": "What is 2+2? Answer naïvely 😀."}]
NO_SYSTEM = [TURNS[:1], TURNS[:2], TURNS]
CHATS = NO_SYSTEM + [[SYSTEM] + chat for chat in NO_SYSTEM]

# Meta's Llama-2-chat template, as its tokenizer_config.json ships it
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Mistral-7B-Instruct-v0.1's: no system message, no spaces around the answer, one BOS
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Llama-3-Instruct's
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Llama-3.1-Instruct's, without its tool-calling branches: the system header carries today's date
LLAMA31 = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


def exported(export, src, out_dir):
    out_dir.mkdir()
    cfg = export(src, out_dir)
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return T.load_tokenizer(out_dir), cfg


def check_like_transformers(tok, ref, template, chats=CHATS):
    """Same text as transformers' apply_chat_template(tokenize=False), same ids as tokenize=True."""
    for chat in chats:
        for gen in (True, False):
            kw = dict(chat_template=template, add_generation_prompt=gen)
            assert tok.render_chat_text(chat, gen) == ref.apply_chat_template(chat, tokenize=False, **kw), (chat, gen)
            want = ref.apply_chat_template(chat, tokenize=True, return_dict=True, **kw)["input_ids"]
            assert tok.encode_chat(chat, gen) == list(want), (chat, gen)


# ----------------------------------------------------------------------------------------------------------
# byte-level BPE: the tiny HF and GGUF tokenizers the converter tests use, a Llama-3.1-style template


def test_tiny_hf_directory(tmp_path):
    """The tokenizer files convert_hf exports (transformers saves the template as chat_template.jinja)."""
    save_hf_tokenizer(tmp_path / "src")
    tok, cfg = exported(T.export_tokenizer_hf, tmp_path / "src", tmp_path / "out")
    assert (cfg["chat_template_jinja"], cfg["bos_token"], cfg["eos_token"]) == (
        CHAT_TEMPLATE, "<|im_start|>", "<|im_end|>")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "src"))
    check_like_transformers(tok, ref, CHAT_TEMPLATE)


def test_tiny_gguf(tmp_path):
    """A GGUF's tokenizer.chat_template (SmolLM2's shape: a default system message when the chat has none)."""
    tok, _, _ = bpe_gguf(tmp_path, "smollm")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="bpe-smollm.gguf")
    check_like_transformers(tok, ref, SMOL_JINJA)
    assert tok.render_chat_text(TURNS[:1]).startswith("<|im_start|>system\nYou are a tiny test model<|im_end|>")


def test_llama31_date_header_and_bos(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    llama3_style_json(src / "tokenizer.json")  # its post-processor adds <|begin_of_text|>: add_bos
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA31}))
    tok, cfg = exported(T.export_tokenizer_hf, src, tmp_path / "out")
    assert cfg["add_bos"] and cfg["chat_template_jinja"] == LLAMA31
    ref = transformers.AutoTokenizer.from_pretrained(str(src))
    check_like_transformers(tok, ref, LLAMA31)
    assert f"Today Date: {datetime.now():%d %b %Y}\n\n" in tok.render_chat_text(TURNS)
    ids = tok.encode_chat(TURNS)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # the template's BOS, none added
    # a template that renders no BOS for a tokenizer that adds one: one is added (llama.cpp's rule)
    tok.chat_template_jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tok.encode_chat(TURNS[:1]) == [tok.bos_id] + tok.encode("Hi there", bos=False)


# ----------------------------------------------------------------------------------------------------------
# SentencePiece vocabularies: "<s>", "</s>" in the rendered text are split off and mapped to their ids


def sentencepiece_dir(path, sp, template):
    """A SentencePiece tokenizer.model directory as Llama-2/Mistral ship it; legacy: SentencePiece's own encoding of
    each text run (a dummy prefix after every special token), which Meta's reference and llama.cpp use."""
    path.mkdir()
    (path / "tokenizer.model").write_bytes(sp.serialized_model_proto())
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "chat_template": template}))
    return path


def sentencepiece_gguf(path, sp, template):
    """The same vocabulary as llama.cpp writes it into a GGUF (exported as a llama2c tokenizer.bin)."""
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 4 if t == "<tool>" else 1
             for i, t in enumerate(tokens)]
    return write_gguf(path, "llama", tokens, types, scores=[sp.get_score(i) for i in range(len(tokens))], bos=1,
                      eos=2, unk=0, chat=template)


@pytest.mark.parametrize("template", ["llama-2", "mistral"])
def test_sentencepiece(tmp_path, template):
    pytest.importorskip("google.protobuf", reason="transformers reads a tokenizer.model with protobuf")
    jinja, chats = (LLAMA2, CHATS) if template == "llama-2" else (MISTRAL, NO_SYSTEM)
    sp = train_sp()
    src = sentencepiece_dir(tmp_path / "src", sp, jinja)
    sp_tok, cfg = exported(T.export_tokenizer_hf, src, tmp_path / "sp")
    gguf = sentencepiece_gguf(tmp_path / "sp.gguf", sp, jinja)
    gguf_tok, _ = exported(T.export_tokenizer_gguf, gguf, tmp_path / "gguf")
    assert (sp_tok.type, gguf_tok.type, cfg["add_bos"]) == ("sentencepiece", "llama2c", True)
    ref = transformers.AutoTokenizer.from_pretrained(str(src))
    for tok in (sp_tok, gguf_tok):
        check_like_transformers(tok, ref, jinja, chats)
    if template == "llama-2":  # Meta's reference, and the hand-written template old checkpoints name
        want = [1] + sp.encode("[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! How can I help? ")
        assert sp_tok.encode_chat([SYSTEM] + TURNS[:2]) == want + [2]
        sp_tok.chat_template, sp_tok.chat_template_jinja = "llama-2", None
        assert sp_tok.encode_chat([SYSTEM] + TURNS[:2]) == want + [2]
    else:
        assert gguf_tok.encode_chat(TURNS[:2]) == (
            [1] + sp.encode("[INST] Hi there [/INST] Hello! How can I help? ") + [2])
        with pytest.raises(FastEagleError, match=r"^the chat template refuses these messages: Conversation roles must "
                                                 r"alternate user/assistant/user/assistant/\.\.\.$"):
            gguf_tok.encode_chat([SYSTEM] + TURNS[:1])


# ----------------------------------------------------------------------------------------------------------
# tiktoken: Llama-3's template renders what the hand-written llama-3 template does


def test_tiktoken(tmp_path):
    src, _ = tiktoken_dir(tmp_path)
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3}))
    tok, cfg = exported(T.export_tokenizer_hf, src, tmp_path / "out")
    assert (tok.type, cfg["chat_template_jinja"]) == ("tiktoken", LLAMA3)
    hand_written = T.load_tokenizer(tmp_path / "out", {**cfg, "chat_template_jinja": None, "chat_template": "llama-3"})
    for chat in CHATS:
        for gen in (True, False):
            assert tok.encode_chat(chat, gen) == hand_written.encode_chat(chat, gen), (chat, gen)


# ----------------------------------------------------------------------------------------------------------
# helpers, errors


@pytest.fixture
def tiny(tmp_path):
    save_hf_tokenizer(tmp_path / "src")
    tok, _ = exported(T.export_tokenizer_hf, tmp_path / "src", tmp_path / "out")
    return tok, transformers.AutoTokenizer.from_pretrained(str(tmp_path / "src"))


def test_tojson_and_loop_controls(tiny):
    tok, ref = tiny
    tok.chat_template_jinja = (
        "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|"
        "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}")
    chat = [{"role": "user", "content": "naïve <b>\"😀\"</b>"}, {"role": "assistant", "content": "ok"}]
    text = tok.render_chat_text(chat)
    assert text == ref.apply_chat_template(chat, chat_template=tok.chat_template_jinja, tokenize=False)
    assert text.startswith(json.dumps(chat, ensure_ascii=False) + "|{\n  \"role\": \"user\",") and text.endswith("|user")


# In the shape of Qwen3's template (written for this test): a namespace found by walking the messages backwards,
# `is string` tests, reasoning split off at '</think>' and shown only after the last user query, and the
# `enable_thinking` switch transformers leaves undefined unless the caller passes it.
QWEN3_STYLE = """{%- set ns = namespace(last_query=messages|length - 1) %}
{%- for m in messages[::-1] %}
    {%- set i = messages|length - 1 - loop.index0 %}
    {%- if m.role == "user" and m.content is string and not m.content.startswith("<tool_response>") %}
        {%- set ns.last_query = i %}{% break %}
    {%- endif %}
{%- endfor %}
{%- for m in messages %}
    {%- set content = m.content if m.content is string else "" %}
    {%- if m.role == "assistant" %}
        {%- set reasoning = "" %}
        {%- if "</think>" in content %}
            {%- set reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n") %}
            {%- set content = content.split("</think>")[-1].lstrip("\n") %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query and reasoning %}
            {{- "<|im_start|>assistant\n<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content + "<|im_end|>\n" }}
        {%- else %}
            {{- "<|im_start|>assistant\n" + content + "<|im_end|>\n" }}
        {%- endif %}
    {%- else %}
        {{- "<|im_start|>" + m.role + "\n" + content + "<|im_end|>\n" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|im_start|>assistant\n" }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- "<think>\n\n</think>\n\n" }}{%- endif %}
{%- endif %}"""


def test_qwen3_style_template(tiny):
    tok, ref = tiny
    tok.chat_template_jinja = QWEN3_STYLE
    thought = {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}
    chats = CHATS + [TURNS + [thought], TURNS + [thought, {"role": "user", "content": "and 3+3?"}]]
    check_like_transformers(tok, ref, QWEN3_STYLE, chats)
    assert "<think>\nadd them\n</think>" in tok.render_chat_text(chats[-2], False)  # after the last query: kept
    assert "add them" not in tok.render_chat_text(chats[-1])  # before it: dropped


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('System messages are not supported') }}",
     "the chat template refuses these messages: System messages are not supported"),
    ("{% for m in messages %}{{ m }}", "the chat template does not parse: Unexpected end of template.*"),
    ("{{ messages.append(1) }}", "the chat template failed on these messages: access to attribute 'append' .* is unsafe\\."),
    ("{{ messages[0]['content'] + 1 }}", "the chat template failed on these messages: .*"),
])
def test_template_errors_are_one_line(tiny, template, message):
    tok, _ = tiny
    tok.chat_template_jinja = template
    with pytest.raises(FastEagleError, match=f"^{message}$") as e:
        tok.encode_chat(TURNS)
    assert "\n" not in str(e.value)


def test_messages_are_checked(tiny):
    tok, _ = tiny
    for bad, message in [([], "no chat messages"), ("Hi", "must be a list"), ([{"role": "user"}], "bad chat message"),
                         ([{"role": "tool", "content": "42"}], "chat message 0 has role 'tool'")]:
        with pytest.raises(FastEagleError, match=message):
            tok.encode_chat(bad)
        with pytest.raises(FastEagleError, match=message):
            T.render_chat("chatml", bad)  # the hand-written templates too


# ----------------------------------------------------------------------------------------------------------
# SmolLM2, the default model


@pytest.mark.slow
def test_smollm2(tmp_path):
    """The real GGUF's template, exported afresh (checkpoints converted before templates were stored name the
    hand-written ChatML template with SmolLM2's default system message: same ids)."""
    from fasteagle.download import fetch_smollm2_gguf

    gguf = fetch_smollm2_gguf()  # the cached copy the default checkpoint is converted from
    tok, cfg = exported(T.export_tokenizer_gguf, gguf, tmp_path / "out")
    ref = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    check_like_transformers(tok, ref, cfg["chat_template_jinja"])
    old = T.load_tokenizer(tmp_path / "out", {
        **cfg, "chat_template_jinja": None, "chat_template": "chatml",
        "tokenizer": {**cfg["tokenizer"], "default_system": "You are a helpful AI assistant named SmolLM, trained by "
                                                            "Hugging Face"}})
    for chat in CHATS:
        for gen in (True, False):
            assert old.encode_chat(chat, gen) == tok.encode_chat(chat, gen), (chat, gen)
