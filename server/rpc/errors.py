"""The one place engine errors become gRPC status codes (by the canonical names errors.py gives them)."""

import logging

import grpc

from .. import errors

log = logging.getLogger(__name__)


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    return grpc.StatusCode[errors.status_of(exc)], errors.message_of(exc)


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception):
    """Ends the call with exc's status. Anything that is not a LoraplexError is a bug of ours: INTERNAL (not
    grpc's UNKNOWN for an escaped exception), with its traceback in the log."""
    code, message = status_for(exc)
    if not isinstance(exc, errors.LoraplexError):
        log.error("internal error in a gRPC handler", exc_info=exc)
    await context.abort(code, message)
