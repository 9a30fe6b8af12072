"""Python clients for a loraplex server, and the `loraplex` command (loraplex.clients.cli)."""

from .client import (AsyncClient, Client, Generation, GenerationChunk, ModelInfo, Token, Tokenization,
                     build_generate_request)
from .errors import (Cancelled, DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, LoraplexError,
                     NotFound, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable, from_rpc_error)

__all__ = [
    "AsyncClient", "Client", "Generation", "GenerationChunk", "ModelInfo", "Token", "Tokenization",
    "build_generate_request",
    "LoraplexError", "InvalidArgument", "NotFound", "FailedPrecondition", "ResourceExhausted", "Unavailable",
    "Unauthenticated", "PermissionDenied", "Cancelled", "DeadlineExceeded", "Internal", "from_rpc_error",
]
