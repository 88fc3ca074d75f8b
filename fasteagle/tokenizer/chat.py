"""Chat templates: messages -> the prompt text a model was trained on.

The model's own template: a checkpoint converted from an HF directory or a GGUF file carries the source model's Jinja
chat template, rendered here as transformers renders it: a sandboxed jinja2 environment (trim_blocks, lstrip_blocks,
loop controls) with the variables and helpers transformers provides (messages, add_generation_prompt, bos_token,
eos_token, tools=None, documents=None, raise_exception, strftime_now, a tojson that keeps non-ASCII text).
Tokenizer.encode_chat maps the special-token strings of the rendered text to their ids.

Hand-written templates, for checkpoints that carry none (llama2.c files, checkpoints converted before templates were
stored): plain functions that render messages into text segments and special tokens (Special), following each
model's reference: Meta's llama chat_completion for llama-2, FastChat's vicuna_v1.1, the Llama-3-Instruct template,
and ChatML as SmolLM2/Qwen2 write it.
"""
import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fasteagle.errors import FastEagleError

ROLES = ("system", "user", "assistant")
CHAT_TEMPLATES = ("llama-2", "vicuna", "llama-3", "chatml")
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def check_messages(messages) -> list[dict]:
    """A non-empty list of {"role": system | user | assistant, "content": str} dicts, or a one-line FastEagleError."""
    if not isinstance(messages, (list, tuple)):
        raise FastEagleError(
            f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise FastEagleError("no chat messages (the list is empty)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise FastEagleError(f"bad chat message {m!r}: expected a dict with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise FastEagleError(f"chat message {i} has role {m['role']!r} (expected one of {', '.join(ROLES)})")
    return list(messages)


# ----------------------------------------------------------------------------------------------------------
# the model's own Jinja template


def _raise_exception(message):
    raise FastEagleError(f"the chat template refuses these messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson: plain JSON (jinja's own filter escapes HTML characters), non-ASCII kept, optional indent."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(source)


def render_jinja(source: str, messages, add_generation_prompt: bool = True, **special_tokens) -> str:
    """Render a Jinja chat template as transformers' apply_chat_template(..., tokenize=False) does. special_tokens:
    bos_token= / eos_token= text (None: undefined in the template, as for a tokenizer that has none)."""
    messages = check_messages(messages)
    tokens = {name: text for name, text in special_tokens.items() if text is not None}
    try:
        return _compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                       documents=None, **tokens)
    except jinja2.TemplateSyntaxError as e:
        raise FastEagleError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None
    except (jinja2.TemplateError, TypeError) as e:  # e.g. an undefined value used, a sandbox violation
        raise FastEagleError(f"the chat template failed on these messages: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# hand-written templates


class Special(str):
    """A special token inside a rendered chat (its text is the token's content, e.g. "<|im_start|>")."""


def _alternating(msgs, template):
    for i, m in enumerate(msgs):
        want = ("user", "assistant")[i % 2]
        if m["role"] != want:
            raise FastEagleError(
                f"the {template} chat template needs an optional system message, then user/assistant turns "
                f"alternating from user; message {i} has role {m['role']!r}"
            )


def render_chat(template: str, messages, add_generation_prompt: bool = True, default_system: str | None = None):
    """Render messages with a hand-written template (one of CHAT_TEMPLATES) into a list of text (str) and
    special-token (Special) segments; "".join() gives the prompt as text. default_system: ChatML's system message when
    the chat has none (SmolLM2's template has one)."""
    msgs = check_messages(messages)
    out: list[str] = []
    if template == "llama-2":
        if msgs[0]["role"] == "system":
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
        if msgs[0]["role"] == "system":
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
        if msgs[0]["role"] != "system" and default_system is not None:
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
