"""Errors the engine raises; the gRPC layer maps each to one status code (see rpc/errors.py)."""


class LoraplexError(Exception):
    """Base class: the message is shown to the client as is."""


class InvalidArgumentError(LoraplexError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFoundError(LoraplexError):
    pass


class FailedPreconditionError(LoraplexError):
    pass


class ResourceExhaustedError(LoraplexError):
    pass


class UnavailableError(LoraplexError):
    pass


class InternalError(LoraplexError):
    pass
