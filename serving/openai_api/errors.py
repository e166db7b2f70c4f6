"""APIError: an OpenAI-style error that a handler raises and the app turns into a JSON response.

Every failure a client can cause becomes a 4xx with `{"error": {"message", "type", "param",
"code"}}`, whose message says what to change; the official clients raise it as
`openai.BadRequestError` etc. with that message.
"""

from __future__ import annotations

from pydantic import ValidationError

from serving.openai_api.protocol import ErrorBody, ErrorResponse
from visualchat.images import ImageError
from visualchat.processor import ContextLengthError

# Error types by status, as OpenAI names them.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}

# Names of the request's sampling fields, to point `param` at the one a ValueError names.
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = ErrorResponse(
            error=ErrorBody(
                message=message,
                type=type or _TYPES.get(status_code, "invalid_request_error"),
                param=param,
                code=code,
            )
        )

    @classmethod
    def from_validation(cls, exc: ValidationError) -> APIError:
        """400 naming the field; malformed JSON and a non-object body get their own message."""
        errors = exc.errors(include_url=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            return cls(400, f"the request body is not valid JSON ({first['msg']})")
        if not first["loc"]:
            return cls(400, f"the request body must be a JSON object ({first['msg']})")
        # A union field reports one error per member; keep the most specific location and say
        # every member's complaint about it ("a valid string, or a valid array").
        param = max((_param(e["loc"]) for e in errors), key=len)
        first_msg, *others = dict.fromkeys(e["msg"] for e in errors if _param(e["loc"]) == param)
        message = first_msg + "".join(f", or {m.removeprefix('Input should be ')}" for m in others)
        return cls(400, f"{param}: {message}", param=param)

    @classmethod
    def from_value_error(cls, exc: ValueError) -> APIError:
        """400 for a bad conversation, image, context length or sampling value."""
        message = str(exc)
        if isinstance(exc, ContextLengthError):
            return cls(400, message, param="messages", code="context_length_exceeded")
        if isinstance(exc, ImageError):
            return cls(400, message, param="messages", code="invalid_image")
        first_word = message.split(" ", 1)[0]
        if first_word in _SAMPLING_FIELDS:
            return cls(400, message, param=first_word)
        if message.startswith("messages"):
            return cls(400, message, param=message.split(":", 1)[0])
        return cls(400, message)


def _param(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'content', 'list[ContentPart]', 1, 'type') -> 'messages[0].content[1].type'.

    Union members appear in pydantic's locations as type names; they are not fields."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif not _is_union_member(item):
            out += f".{item}" if out else item
    return out


def _is_union_member(item: str) -> bool:
    return "[" in item or item in ("str", "int", "float", "bool", "none") or item[:1].isupper()
