"""Errors the engine raises; the gRPC layer maps each to one status code (see rpc/errors.py).

Each error also carries a `reason`, the label it is counted under in `loraplex_request_failure_total`
(see metrics.py); a raise site that knows better sets it with `because`.
"""


class LoraplexError(Exception):
    """Base class: the message is shown to the client as is."""
    reason = "internal"

    def because(self, reason: str) -> "LoraplexError":
        """This error, counted under `reason` instead of its class's default."""
        self.reason = reason
        return self


class InvalidArgumentError(LoraplexError):
    reason = "validation"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")


class NotFoundError(LoraplexError):
    reason = "adapter_not_found"       # the only thing a generation request can name that may be missing


class FailedPreconditionError(LoraplexError):
    reason = "adapter_load"            # an adapter whose files cannot be served


class ResourceExhaustedError(LoraplexError):
    reason = "resource_exhausted"


class UnavailableError(LoraplexError):
    reason = "unavailable"


class InternalError(LoraplexError):
    reason = "internal"
