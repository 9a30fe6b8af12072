"""Errors in OpenAI's JSON shape, {"error": {"message", "type", "param", "code"}}, with the HTTP status of each
canonical status (the mapping Google's API guidelines give for gRPC codes)."""

from starlette.responses import JSONResponse

from ..errors import InvalidArgumentError, LoraplexError, message_of, status_of

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
               "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
               "INTERNAL": 500, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
# OpenAI's error types, by HTTP status
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class HttpError(LoraplexError):
    """An error only HTTP has (a body too large, a wrong method): its HTTP status given directly."""

    def __init__(self, http_status: int, message: str, code: str):
        super().__init__(message)
        self.http_status = http_status
        self.code = code


def error_body(exc: BaseException) -> tuple[int, dict]:
    """(HTTP status, body) for an error; anything that is not ours is a 500 whose message names its type."""
    if isinstance(exc, HttpError):
        status, code = exc.http_status, exc.code
    else:
        status, code = HTTP_STATUS.get(status_of(exc), 500), status_of(exc).lower()
    param = exc.field if isinstance(exc, InvalidArgumentError) else None
    message = exc.detail if isinstance(exc, InvalidArgumentError) else message_of(exc)
    if param:
        message = f"{param}: {message}"
    return status, {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                              "code": code}}


def error_response(exc: BaseException, headers: dict | None = None) -> JSONResponse:
    status, body = error_body(exc)
    return JSONResponse(body, status_code=status, headers=headers)
