"""Wire models: the OpenAI chat objects this server accepts and returns, plus its own.

Field constraints do the range checks; `ChatCompletionRequest.sampling_params` turns a
request into the engine's own settings, so nothing past the routes handles wire objects.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from app.errors import InvalidRequest
from senab.generation import SamplingParams

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")
MAX_STOP_STRINGS = 4

Role = Literal["system", "developer", "user", "assistant"]
FinishReason = Literal["stop", "length"]

# Request fields of the OpenAI API that this server does not implement. A request that
# sets one to a non-default value gets a 400 naming it, never a silent fallback.
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "tools": None, "tool_choice": None, "functions": None, "function_call": None,
    "parallel_tool_calls": None, "audio": None, "modalities": None, "prediction": None,
    "logit_bias": None, "logprobs": False, "top_logprobs": None, "web_search_options": None,
}


def _check_unicode(text: str, what: str) -> None:
    """Reject unpaired UTF-16 surrogates (JSON allows "\\ud800"; UTF-8 and tokenizers do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} contains an unpaired surrogate {text[exc.start]!r} at index {exc.start}; send valid Unicode"
        ) from None


def _require_unicode(value: str) -> str:
    _check_unicode(value, "the text")
    return value


# A string field that rejects unpaired surrogates; the error's `param` names the field.
UnicodeText = Annotated[str, AfterValidator(_require_unicode)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Role
    content: str | list[dict[str, Any]]
    name: UnicodeText | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("content must be a string or a list of text parts, not null")
        if isinstance(value, list):
            if not value:
                raise ValueError("content must not be an empty list; send at least one text part")
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(
                        f"content part {i} has type {kind!r}; only text parts "
                        f"({{\"type\": \"text\", \"text\": ...}}) are supported"
                    )
                _check_unicode(part["text"], f"content part {i}")
        elif isinstance(value, str):
            _check_unicode(value, "content")
        else:
            raise ValueError(f"content must be a string or a list of text parts, not {type(value).__name__}")
        return value

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # NaN fails every bound check and pydantic then names the bound, so non-finite numbers get their own error.
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                description="Nucleus size; 0 keeps only the most likely token.")
    top_k: int | None = Field(None, ge=-1, description="Keep the k most likely tokens; 0 or -1 turns it off.")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    user: UnicodeText | None = None
    n: int | None = Field(None, ge=1)

    # --- SENAB extensions beyond the OpenAI API ---
    session_id: str | None = Field(None, description="Session to continue; the X-Session-Id header also works.")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(stops)}")
        for stop in stops:
            if stop == "":
                raise ValueError("stop strings must not be empty")
            _check_unicode(stop, "a stop string")
        return value

    def check_supported(self) -> None:
        """Reject OpenAI features this server does not implement, naming the field."""
        if self.n is not None and self.n != 1:
            raise InvalidRequest(f"n={self.n} is not supported; this server returns one choice (n=1).", param="n")
        extra = self.model_extra or {}
        for name, default in UNSUPPORTED_FIELDS.items():
            if name in extra and extra[name] not in (default, None, [], False):
                raise InvalidRequest(f"'{name}' is not supported by this server; remove it from the request.",
                                     param=name)
        response_format = extra.get("response_format")
        if response_format is not None and not (isinstance(response_format, dict)
                                                and response_format.get("type", "text") == "text"):
            raise InvalidRequest("response_format other than {'type': 'text'} is not supported.",
                                 param="response_format")
        if self.messages[-1].role != "user":
            raise InvalidRequest(
                f"The last message must have role 'user' (got '{self.messages[-1].role}'); "
                "each request continues the conversation with a new user turn.",
                param=f"messages.{len(self.messages) - 1}.role",
            )

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(self, max_tokens: int, *, default_temperature: float = 1.0,
                        default_top_p: float = 1.0) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=default_top_p if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=self.stop_strings(),
        )


class SenabInfo(BaseModel):
    """The session's state after the response, attached to every completion."""

    session_id: str
    turn: int
    valence: float | None
    arousal: float
    distance: float


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: FinishReason
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    senab: SenabInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    senab: SenabInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "senab"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- SENAB objects ---


class SessionState(BaseModel):
    session_id: str
    turn: int
    valence: float | None
    arousal: float
    distance: float
    state: list[float]
    checkpoint: str
    updated_at: float


class TrajectoryPoint(BaseModel):
    turn: int
    time: float
    valence: float | None
    arousal: float
    distance: float
    state: list[float]


class Trajectory(BaseModel):
    session_id: str
    points: list[TrajectoryPoint]


class ResetResponse(BaseModel):
    session_id: str
    turn: int
    reset: bool = True


class DeleteResponse(BaseModel):
    id: str
    object: Literal["session"] = "session"
    deleted: bool


def check_session_id(session_id: str, *, param: str = "session_id") -> str:
    # "." and ".." would be rewritten by URL normalisation, so their session endpoints
    # could not be reached.
    if not SESSION_ID_PATTERN.match(session_id) or session_id in (".", ".."):
        shown = session_id if len(session_id) <= 40 else session_id[:40] + "..."
        raise InvalidRequest(
            f"Invalid session id {shown!r}: use 1 to 128 characters from A-Z, a-z, 0-9, '.', '_' and '-' "
            "(not '.' or '..').",
            param=param,
        )
    return session_id
