"""The OpenAI chat-completions wire format: pydantic models for the HTTP boundary only.

Requests are validated strictly (a string where a number belongs is a 400, not coerced), but
unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
Message contents are only type-checked here; what they mean (roles, image URLs, tool calls)
is decided by `visualchat.messages.Conversation.from_openai`, the one parser of that dialect,
which is why messages keep their extra fields.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

FinishReason = Literal["stop", "length"]

# --- requests -----------------------------------------------------------------------------------


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")

    url: str  # data:image/png;base64,... (http(s) only when the server allows remote images)
    detail: str | None = None  # accepted and ignored: every image becomes the same token span


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str  # "text" | "image_url"; others are refused by Conversation.from_openai
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls etc. reach from_openai, which refuses

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False  # one more chunk, with no choices, carrying the usage


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    messages: list[ChatMessage]
    model: str | None = None  # None: the served model
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None  # wins over max_tokens when both are given
    temperature: float | None = None  # None: 1.0, as OpenAI
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM's); 0 keeps every token
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None  # only 1 is supported
    ignore_eos: bool = False  # extension (vLLM's): always generate max_tokens
    user: str | None = None  # accepted for compatibility, unused

    def openai_messages(self) -> list[dict[str, Any]]:
        """Messages as plain dicts (extra fields kept) for Conversation.from_openai."""
        return [m.model_dump(exclude_none=True) for m in self.messages]


# --- responses ----------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int  # tokens of the processed prompt, image placeholders included
    completion_tokens: int  # generated tokens, the end-of-turn token included when hit
    total_tokens: int

    @classmethod
    def of(cls, num_prompt_tokens: int, num_completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=num_completion_tokens,
            total_tokens=num_prompt_tokens + num_completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None  # only in the first chunk
    content: str | None = None

    @model_serializer
    def _without_absent_fields(self) -> dict[str, str]:
        fields = {"role": self.role, "content": self.content}
        return {key: value for key, value in fields.items() if value is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]  # empty in the usage chunk
    usage: Usage | None = None  # only in the usage chunk (stream_options.include_usage)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "visualchat"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str  # what was wrong and what to do about it
    type: str  # "invalid_request_error" | "authentication_error" | "server_error" | ...
    param: str | None = None  # the offending request field, e.g. "messages[0].content"
    code: str | None = None  # e.g. "context_length_exceeded", "invalid_api_key"


class ErrorResponse(BaseModel):
    error: ErrorBody
