"""The one place engine errors become gRPC status codes."""

import logging

import grpc

from .. import errors

log = logging.getLogger(__name__)

STATUS = {
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.InternalError: grpc.StatusCode.INTERNAL,
}


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    for kind, code in STATUS.items():
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception):
    """Ends the call with exc's status. Anything that is not a LoraplexError is a bug of ours: INTERNAL (not
    grpc's UNKNOWN for an escaped exception), with its traceback in the log."""
    code, message = status_for(exc)
    if not isinstance(exc, errors.LoraplexError):
        log.error("internal error in a gRPC handler", exc_info=exc)
    await context.abort(code, message)
