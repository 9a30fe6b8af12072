"""Typed client errors: one class per gRPC status code the server uses, built from a failed RPC in one place.

Catch `LoraplexError` for any failure, or a subclass for one kind:

    try:
        client.generate("hi", adapter_id="nope")
    except NotFound as exc:
        print(exc.code, exc.details)
"""

import grpc


class LoraplexError(Exception):
    """A failed RPC. `.code` is the grpc.StatusCode, `.details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", code: grpc.StatusCode | None = None):
        if code is not None:
            self.code = code
        self.details = details
        super().__init__(f"{self.code.name}: {details}" if details else self.code.name)


class InvalidArgument(LoraplexError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LoraplexError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(LoraplexError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(LoraplexError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LoraplexError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(LoraplexError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(LoraplexError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(LoraplexError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(LoraplexError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(LoraplexError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted, Unavailable,
                                      Unauthenticated, PermissionDenied, Cancelled, DeadlineExceeded, Internal)}


def from_rpc_error(error: grpc.RpcError) -> LoraplexError:
    """The typed error for a failed call, sync or grpc.aio (both expose code() and details()).

    Codes without a class of their own (UNIMPLEMENTED, UNKNOWN, ...) give a plain LoraplexError carrying the code.
    """
    code = _call_or_none(error, "code") or grpc.StatusCode.UNKNOWN
    details = _call_or_none(error, "details") or ""
    cls = _BY_CODE.get(code)
    return cls(details) if cls is not None else LoraplexError(details, code)


def _call_or_none(error: grpc.RpcError, name: str):
    # A bare grpc.RpcError (raised by some interceptors) has neither method.
    method = getattr(error, name, None)
    return method() if callable(method) else None
