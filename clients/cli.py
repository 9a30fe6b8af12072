"""The `loraplex` command: run the server, talk to it, or see it all at once with `loraplex demo`.

    loraplex serve [--port 50051 --model DIR ...]      the server (flags: loraplex serve --help)
    loraplex generate "Once upon a time" --stream       text to stdout, stop reason and token counts to stderr
    loraplex generate --chat "What is 2 + 2?"
    loraplex info | health | tokenize TEXT
    loraplex demo                                       starts a server, asks it two things, stops it
    loraplex bench [...]                                benchmarks (flags: loraplex bench --help)
    loraplex train DIR --task title                     trains a demo adapter (flags: loraplex train --help)

Connection flags have environment equivalents: --target LORAPLEX_TARGET, --timeout LORAPLEX_TIMEOUT,
--token LORAPLEX_TOKEN; demo's --startup-timeout is LORAPLEX_STARTUP_TIMEOUT. Per-request flags of `generate`
have none: several names (LORAPLEX_MAX_NEW_TOKENS, ...) are already server settings with another meaning.
"""

import argparse
import os
import sys
from dataclasses import fields

from .client import DEFAULT_TARGET, Client, ModelInfo
from .adapters_cli import add_adapters
from .errors import LoraplexError
from .output import print_stream, summary
from .tls import credentials

DELEGATED = ("serve", "bench", "train")   # everything after these words goes to their own parsers untouched


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if extra and args.command != "demo":   # only demo forwards flags it does not know (to the server)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args, extra)
    except LoraplexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _delegate(command: str, rest: list[str]) -> int:
    # Imported here: the server pulls in torch, which the client verbs do not need.
    if command == "serve":
        from loraplex.server.main import main as run
    elif command == "train":
        from loraplex.adapters.train import main as run
    else:
        from loraplex.bench import main as run
        run = getattr(run, "main", run)   # a function in bench/__init__.py or the module bench/main.py
    return run(rest) or 0


def build_parser(environ=None) -> argparse.ArgumentParser:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="loraplex", description="A gRPC server for a 4-bit model and its LoRAs.",
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="run the server (see loraplex serve --help)", add_help=False)
    connection = _connection_flags(environ)
    _add_generate(commands, connection)
    info = commands.add_parser("info", parents=[connection], help="describe the served model")
    info.set_defaults(run=_info)
    health = commands.add_parser("health", parents=[connection], help="serving status; exit 0 if SERVING")
    health.add_argument("--service", default="", help="one service's full name; empty = the whole server")
    health.set_defaults(run=_health)
    tokenize = commands.add_parser("tokenize", parents=[connection], help="text to token ids")
    tokenize.add_argument("text")
    tokenize.add_argument("--tokens", action="store_true", help="also print each token's text")
    tokenize.set_defaults(run=_tokenize)
    add_adapters(commands, connection)
    _add_demo(commands, environ)
    commands.add_parser("bench", help="benchmarks (see loraplex bench --help)", add_help=False)
    commands.add_parser("train", help="train a demo adapter with PEFT (see loraplex train --help)", add_help=False)
    return parser


def _connection_flags(environ) -> argparse.ArgumentParser:
    # String defaults go through `type`, so a bad LORAPLEX_TIMEOUT is reported like a bad --timeout.
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--target", default=environ.get("LORAPLEX_TARGET", DEFAULT_TARGET),
                       help=f"server address host:port [env LORAPLEX_TARGET, default {DEFAULT_TARGET}]")
    flags.add_argument("--timeout", type=float, default=environ.get("LORAPLEX_TIMEOUT"),
                       help="seconds per call; unset = no deadline [env LORAPLEX_TIMEOUT]")
    flags.add_argument("--token", default=environ.get("LORAPLEX_TOKEN"),
                       help="bearer token sent as authorization metadata [env LORAPLEX_TOKEN]")
    flags.add_argument("--tls-ca", default=environ.get("LORAPLEX_TLS_CA"),
                       help="PEM CA bundle: connect over TLS, trusting it [env LORAPLEX_TLS_CA]")
    flags.add_argument("--tls-cert", default=environ.get("LORAPLEX_TLS_CERT"),
                       help="PEM client certificate for mTLS, with --tls-key [env LORAPLEX_TLS_CERT]")
    flags.add_argument("--tls-key", default=environ.get("LORAPLEX_TLS_KEY"),
                       help="PEM private key of --tls-cert [env LORAPLEX_TLS_KEY]")
    return flags



def _add_generate(commands, connection) -> None:
    p = commands.add_parser("generate", parents=[connection], help="generate text from a prompt")
    p.add_argument("prompt", help='prompt text; "-" reads it from stdin')
    p.add_argument("--adapter", default="", help="LoRA adapter id; empty = the base model")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--chat", action="store_true", help="send PROMPT as one user message (chat template)")
    p.add_argument("--system", help="a system message before PROMPT (implies --chat)")
    p.add_argument("--max-new-tokens", type=int, help="unset = the server's default")
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, help="unset = random (printed with the stop reason)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--stop", action="append", default=[], metavar="SEQ", help="stop sequence (repeatable)")
    p.add_argument("--include-stop-sequence", action="store_true")
    p.add_argument("--time-limit-ms", type=int, default=0, help="0 = none")
    p.add_argument("--truncate-input-tokens", type=int, default=0, help="keep the prompt's last N tokens")
    p.add_argument("--logprobs", action="store_true", help="print each token's logprob to stderr")
    p.add_argument("--top-n-tokens", type=int, default=0, help="with --logprobs, also the n likeliest tokens")
    p.add_argument("--request-id", default="")
    p.set_defaults(run=_generate)


def _add_demo(commands, environ) -> None:
    p = commands.add_parser("demo", allow_abbrev=False, help="start a server, ask it (and two demo adapters) some questions, stop it",
                            description="Flags demo does not know are passed to `loraplex serve`.")
    p.add_argument("--port", type=int, default=0, help="server port; 0 = a free one")
    p.add_argument("--adapters", help="directory of the demo adapters, trained there when missing "
                                      "[~/.cache/loraplex/demo-adapters]")
    p.add_argument("--no-adapters", action="store_true", help="skip the demo adapters")
    p.add_argument("--train-steps", type=int, help="training steps of every demo adapter [title 80, json 60]")
    p.add_argument("--startup-timeout", type=float, default=environ.get("LORAPLEX_STARTUP_TIMEOUT", "600"),
                   help="seconds to wait for SERVING [env LORAPLEX_STARTUP_TIMEOUT, default 600]")
    p.set_defaults(run=_demo)


def _demo(args, server_flags: list[str]) -> int:
    from .demo import run_demo

    return run_demo(args, server_flags)


def _client(args) -> Client:
    return Client(args.target, timeout=args.timeout, token=args.token, credentials=credentials(args))


def generate_kwargs(args) -> dict:
    """Parsed `generate` flags -> keyword arguments of Client.generate (prompt or messages included)."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    kwargs = dict(adapter_id=args.adapter, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                  repetition_penalty=args.repetition_penalty, stop_sequences=tuple(args.stop),
                  include_stop_sequence=args.include_stop_sequence, time_limit_millis=args.time_limit_ms,
                  token_logprobs=args.logprobs, top_n_tokens=args.top_n_tokens,
                  truncate_input_tokens=args.truncate_input_tokens, request_id=args.request_id)
    if args.chat or args.system is not None:
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        kwargs["messages"] = [*system, {"role": "user", "content": prompt}]
    else:
        kwargs["prompt"] = prompt
    return kwargs


def _generate(args, _extra) -> int:
    kwargs = generate_kwargs(args)
    with _client(args) as client:
        if args.stream:
            result, tokens = print_stream(client.generate_stream(**kwargs))
        else:
            result = client.generate(**kwargs)
            tokens = list(result.tokens)
            print(result.text)
    if args.logprobs:
        _print_tokens(tokens)
    print(summary(result), file=sys.stderr)
    return 0


def _print_tokens(tokens) -> None:
    for t in tokens:
        print(f"{t.token_id:>8} {t.logprob:10.4f} {t.text!r}", file=sys.stderr)
        for alt in t.top_tokens:
            print(f"{'':>8}   {alt.token_id:>8} {alt.logprob:10.4f} {alt.text!r}", file=sys.stderr)


def _info(args, _extra) -> int:
    with _client(args) as client:
        info = client.model_info()
    for f in fields(ModelInfo):
        print(f"{f.name:<20} {getattr(info, f.name)}")
    return 0


def _health(args, _extra) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def _tokenize(args, _extra) -> int:
    with _client(args) as client:
        result = client.tokenize(args.text, return_tokens=args.tokens)
    print(f"{result.token_count} tokens")
    if args.tokens:
        for token_id, text in zip(result.token_ids, result.tokens):
            print(f"{token_id:>8} {text!r}")
    else:
        print(" ".join(str(i) for i in result.token_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
