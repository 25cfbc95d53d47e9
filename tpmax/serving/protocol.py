"""The OpenAI HTTP protocol of `tpmax serve`: request bodies parsed and type-checked by
pydantic models, sampling options turned into one `SamplingParams` (whose own checks are the
range checks), every fault an OpenAI-style `APIError`, and the response bodies."""
from __future__ import annotations

import json
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..generation.engine import Completion
from ..generation.sampling import SamplingParams

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Accepted when unset, 0, false or empty; anything else would be silently ignored: a 400.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias", "presence_penalty",
               "frequency_penalty")


class APIError(Exception):
    """An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}` with a status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str) -> APIError:
    return APIError(400, message, param=param)


# ------------------------------------------------------------------------------------------
# Request bodies.


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal[CHAT_ROLES]
    content: str | list[TextPart] | None = Field(default=None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_text(cls, v, info):
        if v is None and info.data.get("role") != "assistant":
            raise ValueError("must be a string or a list of text parts")
        return v

    def text(self) -> str:
        c = self.content
        return "" if c is None else c if isinstance(c, str) else "".join(p.text for p in c)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Request(_Strict):
    """The fields both endpoints share (extensions as in vLLM: top_k, ignore_eos)."""

    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    best_of: int | None = None
    ignore_eos: bool | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    suffix: Any = None
    tools: Any = None
    functions: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(f"'{info.field_name}' is not supported by this server")
        return v

    @field_validator("n", "best_of")
    @classmethod
    def _one(cls, v, info):
        if v not in (None, 1):
            raise ValueError(f"only {info.field_name}=1 is supported, got {v}")
        return v


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]

    def one_prompt(self) -> str | list[int]:
        """The prompt: a string or token ids (a batch of one is accepted)."""
        p = self.prompt
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            raise bad("prompt", "only one prompt per request is supported")
        if not p:
            raise bad("prompt", "'prompt' must be a non-empty string or a list of token ids")
        return p


_FIELDS = {name for m in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions) for name in m.model_fields}


def _param(loc: tuple) -> str | None:
    """OpenAI's `param` from a pydantic error location: ('messages', 0, 'role') ->
    'messages[0].role' (union members such as 'str' dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELDS:
            out += f".{part}" if out else part
    return out or None


def parse(cls: type[_Request], raw: bytes) -> _Request:
    """A request body from raw JSON; malformed JSON (nested too deep included), a body that
    is not an object and every field of a wrong type are a 400 naming the param."""
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        param = _param(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise bad(param, f"'{param}': {msg}" if param else f"the request body: {msg}") from None


def check_model(req: _Request, name: str) -> None:
    if req.model is not None and req.model != name:
        shown = json.dumps(req.model[:100]) + ("..." if len(req.model) > 100 else "")
        raise APIError(404, f"the model {shown} does not exist; this server serves {json.dumps(name)}",
                       param="model", code="model_not_found")


# ------------------------------------------------------------------------------------------
# Sampling parameters.


def sampling_params(req: _Request, *, default_max_tokens: Callable[[], int], eos: tuple[int, ...],
                    model_defaults=None) -> SamplingParams:
    """SamplingParams from a request. Unset temperature / top_p / top_k take the model's own
    defaults (`model_defaults`, the tokenizer's `GenerationDefaults`: None where the model's
    files say nothing), then OpenAI's (temperature 1, top_p 1, no top-k). Every range is
    checked by `SamplingParams`; its ValueError becomes a 400 naming the request's param."""
    max_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens

    def pick(name: str, openai_default):
        v = getattr(req, name)
        if v is None:
            v = getattr(model_defaults, name, None)
        return openai_default if v is None else v

    top_k = pick("top_k", 0)
    stop = [] if req.stop is None else [req.stop] if isinstance(req.stop, str) else req.stop
    params = {"max_new_tokens": max_tokens if max_tokens is not None else default_max_tokens(),
              "temperature": pick("temperature", 1.0), "top_p": pick("top_p", 1.0),
              "top_k": 0 if top_k == -1 else top_k, "seed": req.seed, "stop": tuple(stop),
              "stop_token_ids": () if req.ignore_eos else eos}
    names = {"max_new_tokens": max_name, "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
             "seed": "seed", "stop": "stop"}
    try:
        p = SamplingParams(**params)
    except ValueError as e:  # SamplingParams names the field first: "top_p must be in (0, 1], got 0"
        msg = str(e)
        param = names.get(msg.split(" ", 1)[0])
        raise bad(param, f"'{param}': {msg}" if param else msg) from None
    return p


# ------------------------------------------------------------------------------------------
# Response bodies.


def usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.tokens),
            "total_tokens": c.prompt_tokens + len(c.tokens)}


class Reply:
    """The response bodies of one request (`endpoint` "chat" or "completions")."""

    def __init__(self, endpoint: str, rid: str, created: int, model: str):
        self.chat = endpoint == "chat"
        self.head = {"id": rid, "created": created, "model": model}

    def whole(self, c: Completion) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                   "finish_reason": c.finish_reason} if self.chat else
                  {"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason})
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion", "choices": [choice],
                "usage": usage(c)}

    def _chunk(self, choices: list[dict], **extra) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({**self.head, "object": obj, "choices": choices, **extra})

    def role(self) -> str | None:
        """The first chunk of a chat stream (the role), None for completions."""
        if not self.chat:
            return None
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def piece(self, text: str | None, finish: str | None = None) -> str:
        if self.chat:
            delta = {} if text is None else {"content": text}
            return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        return self._chunk([{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}])

    def usage_chunk(self, c: Completion) -> str:
        return self._chunk([], usage=usage(c))


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def failed(c: Completion) -> APIError:
    return APIError(500, f"generation failed: {c.error}", type="server_error", code="generation_error")
