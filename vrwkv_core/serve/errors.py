"""API errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a status."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-shaped JSON error with `status`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 500: "server_error",
          503: "server_error"}  # fmt: skip


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


__all__ = ["ApiError", "error_body"]
