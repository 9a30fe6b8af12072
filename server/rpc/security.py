"""Transport security and bearer tokens.

TLS: `--tls-cert`/`--tls-key` serve over TLS; `--tls-client-ca` also requires every client to present a
certificate signed by that CA (mTLS). Tokens: `--auth-token` guards the generation service and
`--admin-token` the adapter service (each off when empty); clients send `authorization: Bearer <token>`.
The two are separate secrets: a generation token does not open the adapter service. Health and
reflection stay open, so probes and tools work without a secret.
"""

import hmac
from pathlib import Path

import grpc

from ..config import ServerConfig


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """None for plaintext; raises ValueError naming the flag for an incomplete or unreadable set-up."""
    if not (config.tls_cert or config.tls_key or config.tls_client_ca):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    pair = (_read(config.tls_key, "--tls-key"), _read(config.tls_cert, "--tls-cert"))
    ca = _read(config.tls_client_ca, "--tls-client-ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror}") from None


class TokenAuth(grpc.aio.ServerInterceptor):
    """Checks the bearer token of every call to a guarded service (service name -> expected token)."""

    def __init__(self, tokens: dict[str, str], on_refused=None):
        """on_refused(service), if given, is called for each call refused (the metrics count them)."""
        self.tokens = {service: token for service, token in tokens.items() if token}
        self.on_refused = on_refused or (lambda service: None)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        service = details.method.lstrip("/").split("/", 1)[0]
        expected = self.tokens.get(service)
        if expected is None:
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            return await continuation(details)
        self.on_refused(service)
        return _refusal("a valid bearer token is required (metadata 'authorization: Bearer <token>')"
                        if not given else "the bearer token is not valid for this service")


def _refusal(message: str) -> grpc.RpcMethodHandler:
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # Both shapes cover every method of our services: unary and server-streaming requests.
    return grpc.unary_unary_rpc_method_handler(deny)
