"""TLS channel credentials from the CLI's connection flags (--tls-ca, --tls-cert, --tls-key)."""

import pathlib

import grpc


def credentials(args) -> grpc.ChannelCredentials | None:
    """None = plaintext. A CA alone: TLS trusting it; with a certificate and key: mTLS."""
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    read = lambda path: pathlib.Path(path).read_bytes() if path else None   # noqa: E731
    return grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
