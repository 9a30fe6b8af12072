"""Errors the engine raises. Each carries the canonical status it ends a call with (`status`, one of the
google.rpc codes that gRPC uses by name and the HTTP endpoint maps to HTTP statuses) and a `reason`, the
label it is counted under in `loraplex_request_failure_total` (see metrics.py); a raise site that knows
better sets the reason with `because`.

Errors cross process boundaries (a cluster replica hands them to the front) by pickling: each one
pickles as its class, message, reason and, for invalid arguments, the field at fault.
"""


class LoraplexError(Exception):
    """Base class: the message is shown to the client as is."""
    reason = "internal"
    status = "INTERNAL"

    def because(self, reason: str) -> "LoraplexError":
        """This error, counted under `reason` instead of its class's default."""
        self.reason = reason
        return self

    def __reduce__(self):
        return _rebuild, (type(self), self.args, self.reason, self.__dict__)


def _rebuild(kind, args, reason, state):
    error = Exception.__new__(kind)
    error.args = args
    error.__dict__.update(state)
    error.reason = reason
    return error


class InvalidArgumentError(LoraplexError):
    """`field` names a logical request field (`temperature`, `max_new_tokens`, `prompt`, ...): each
    transport renames it to its own wire path when it answers (see `renamed`)."""
    reason = "validation"
    status = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message

    def renamed(self, field: str) -> "InvalidArgumentError":
        if field == self.field:
            return self
        return InvalidArgumentError(field, self.detail).because(self.reason)


class NotFoundError(LoraplexError):
    reason = "adapter_not_found"       # the only thing a generation request can name that may be missing
    status = "NOT_FOUND"


class FailedPreconditionError(LoraplexError):
    reason = "adapter_load"            # an adapter whose files cannot be served
    status = "FAILED_PRECONDITION"


class ResourceExhaustedError(LoraplexError):
    reason = "resource_exhausted"
    status = "RESOURCE_EXHAUSTED"


class UnavailableError(LoraplexError):
    reason = "unavailable"
    status = "UNAVAILABLE"


class DeadlineExceededError(LoraplexError):
    reason = "deadline"
    status = "DEADLINE_EXCEEDED"


class InternalError(LoraplexError):
    reason = "internal"
    status = "INTERNAL"


def status_of(exc: BaseException) -> str:
    """The canonical status name an exception ends a call with: anything that is not ours is INTERNAL."""
    return exc.status if isinstance(exc, LoraplexError) else "INTERNAL"


def message_of(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, LoraplexError) else f"internal error: {type(exc).__name__}: {exc}"
