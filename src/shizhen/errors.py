"""Errors a client can be told about, each with the status and OpenAI error type it is answered with.

Raised by the request-handling layers (protocol checks, image intake, the chat service); the API turns them into
`{"error": {"message", "type", "param", "code"}}`. The engine raises its own exceptions, mapped in the service.
"""

from __future__ import annotations


class ServingError(Exception):
    status = 400
    error_type = "invalid_request_error"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after: int | None = None
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


class InvalidRequest(ServingError):
    """The request cannot be served as sent; the message says what to fix."""


class AuthenticationFailed(ServingError):
    status = 401
    error_type = "authentication_error"


class ModelNotFound(ServingError):
    status = 404
    error_type = "not_found_error"


class PayloadTooLarge(ServingError):
    status = 413


class UnsupportedMediaType(ServingError):
    status = 415


class RateLimited(ServingError):
    """Too many requests: this client's rate, or the server's waiting queue. Retry after `Retry-After` seconds."""

    status = 429
    error_type = "rate_limit_error"


class RequestTimedOut(ServingError):
    status = 504
    error_type = "timeout_error"


class ServiceUnavailable(ServingError):
    """The model is loading, failed to load, or the server is shutting down; retry later."""

    status = 503
    error_type = "service_unavailable_error"


class InternalError(ServingError):
    status = 500
    error_type = "internal_server_error"
