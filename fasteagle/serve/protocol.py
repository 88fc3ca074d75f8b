"""The OpenAI request bodies the server accepts, validated before anything reaches the engine, and its error JSON.

A request either becomes a `Generation` (token ids + decoding settings) or raises `APIError`, which the app turns
into the OpenAI error object: {"error": {"message", "type", "param", "code"}} with a 4xx status.
"""
import json
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fasteagle.errors import FastEagleError
from fasteagle.sampling import SamplingParams

MAX_STOPS = 4  # as OpenAI


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI-compatible servers do; fields that
    would change the output in ways this server does not implement are refused (see `unsupported`)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default: sample at 1
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # extension (vLLM's): 0 or -1 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (vLLM's): generate max_tokens tokens whatever the model says
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]
    echo: bool = False
    suffix: str | None = None


@dataclass
class Generation:
    """A validated request, as the worker runs it."""

    prompt_ids: list[int]
    max_tokens: int | None  # None: up to the end of the KV cache
    params: SamplingParams
    seed: int | None
    stops: list[str]
    ignore_eos: bool
    chat: bool  # a chat reply starts fresh; a completion continues its prompt's text


def parse(model_cls, body: bytes):
    """The request body as `model_cls`, or a 400 naming the first bad field."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None


def unsupported(req: _Common):
    """Refuse what would silently differ from the OpenAI semantics."""
    if req.n != 1:
        raise APIError(400, f"n must be 1 (this server decodes one sequence per request), got {req.n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported", param=name)
    if req.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if getattr(req, "tools", None):
        raise APIError(400, "tools are not supported", param="tools")
    if getattr(req, "echo", False) or getattr(req, "suffix", None):
        raise APIError(400, "echo and suffix are not supported", param="echo")


def stop_strings(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise APIError(400, f"stop: at most {MAX_STOPS} non-empty strings", param="stop")
    return stops


def sampling(req: _Common) -> SamplingParams:
    try:
        return SamplingParams(req.temperature, max(req.top_k, 0), req.top_p)
    except FastEagleError as e:
        raise APIError(400, str(e)) from None


def message_text(m: Message) -> str:
    if isinstance(m.content, list):
        if any(p.type != "text" or p.text is None for p in m.content):
            raise APIError(400, "only text content parts are supported", param="messages")
        return "".join(p.text for p in m.content)
    return m.content or ""


def chat_ids(req: ChatRequest, tok) -> list[int]:
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    messages = [{"role": m.role, "content": message_text(m)} for m in req.messages]
    try:
        return tok.encode_chat(messages)
    except FastEagleError as e:  # unknown roles, bad order, a template that refuses the chat
        raise APIError(400, str(e), param="messages") from None


def completion_ids(req: CompletionRequest, tok, vocab_size: int) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "prompt: one prompt per request (a list of several is a batch)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tok.encode(prompt)
    else:
        ids = list(prompt)
        if any(not 0 <= i < vocab_size for i in ids):
            raise APIError(400, f"prompt: token ids must be in [0, {vocab_size})", param="prompt")
    if not ids:
        raise APIError(400, "prompt must not be empty", param="prompt")
    return ids


def generation(req: _Common, ids: list[int], max_seq_len: int, chat: bool) -> Generation:
    """Checks shared by both endpoints, then the worker's view of the request."""
    unsupported(req)
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if len(ids) >= max_seq_len or len(ids) + (max_tokens or 1) > max_seq_len:
        raise APIError(400, f"this model's context (KV cache) holds {max_seq_len} tokens; the prompt has {len(ids)}"
                            + (f" and max_tokens asks for {max_tokens} more" if max_tokens else ""),
                       param="max_tokens" if max_tokens and len(ids) < max_seq_len else "messages" if chat
                       else "prompt", code="context_length_exceeded")
    return Generation(ids, max_tokens, sampling(req), req.seed, stop_strings(req.stop), req.ignore_eos, chat)
