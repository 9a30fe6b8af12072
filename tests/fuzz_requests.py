"""A seeded fuzzer for the gRPC surface: random GenerateRequests with edge values and mangled request bytes.

Every answer must be OK with a well-formed response, or a status a client can act on: never UNKNOWN or
INTERNAL (those are server bugs). `python tests/fuzz_requests.py -n 2000 [--seed S] [--target HOST:PORT]`
runs N cases against a target, or against a tiny random model it starts itself.
"""

import argparse
import logging
import random
import string
import sys

import grpc

from loraplex.v1 import generation_pb2 as pb

BUGS = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
GENERATION = "/loraplex.v1.GenerationService/"
ADAPTERS = "/loraplex.v1.AdapterService/"
METHODS = [GENERATION + m for m in ("Generate", "GenerateStream", "Tokenize", "ModelInfo")] + \
          [ADAPTERS + m for m in ("ListAdapters", "GetAdapter", "LoadAdapter", "UnloadAdapter")]
STREAMING = {GENERATION + "GenerateStream"}

FLOATS = [0.0, -0.0, 1.0, 0.5, 1e-45, 1e-4, 99.9, 100.0, 1e38, -1.0, float("nan"), float("inf"), float("-inf")]
UINT32 = [0, 1, 2, 4, 16, 17, 20, 21, 2**31 - 1, 2**31, 2**32 - 1]
UINT64 = UINT32 + [2**63 - 1, 2**63, 2**64 - 1]
ROLES = ["user", "system", "assistant", "", "robot", "USER", "user\x00"]
ODD_TEXT = ["", "\x00", "../../etc/passwd", "%2e%2e", "/abs", "a" * 300, "\u202e\u0000\ufffd", "😀" * 50,
            "<|im_end|>", "{{ raise_exception('x') }}", "\n" * 40]


def _text(rng: random.Random, max_len: int = 40) -> str:
    kind = rng.random()
    if kind < 0.3:
        return rng.choice(ODD_TEXT)
    if kind < 0.6:
        return "".join(rng.choice(string.printable) for _ in range(rng.randint(1, max_len)))
    # any code point but the surrogates, which a protobuf string cannot hold
    return "".join(chr(rng.choice([rng.randint(1, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                   for _ in range(rng.randint(1, max_len)))


EDGE = 0.07   # each field is at an edge this often: about 40% of requests have none and run to the end


def _pick(rng: random.Random, plausible, edges: list):
    """A plausible value (a callable's result), or now and then one of the edges."""
    return rng.choice(edges) if rng.random() < EDGE else plausible()


def _sampling(rng: random.Random) -> pb.SamplingParameters:
    s = pb.SamplingParameters(
        temperature=_pick(rng, lambda: rng.choice([0.0, rng.uniform(0.1, 1.5)]), FLOATS),
        top_k=_pick(rng, lambda: rng.choice([0, rng.randint(1, 50)]), UINT32),
        top_p=_pick(rng, lambda: rng.choice([0.0, rng.uniform(0.05, 1.0)]), FLOATS),
        repetition_penalty=_pick(rng, lambda: rng.choice([0.0, rng.uniform(0.8, 1.5)]), FLOATS))
    if rng.random() < 0.5:
        s.seed = _pick(rng, lambda: rng.randint(0, 2**32), UINT64)
    return s


def _stopping(rng: random.Random) -> pb.StoppingCriteria:
    st = pb.StoppingCriteria(
        min_new_tokens=_pick(rng, lambda: rng.randint(0, 1), UINT32),
        stop_sequences=_pick(rng, lambda: [_text(rng, 4) or "." for _ in range(rng.randint(0, 2))],
                             [[""], ["x"] * 17, ["y" * 257], [_text(rng, 8)]]),
        include_stop_sequence=rng.random() < 0.5,
        time_limit_millis=_pick(rng, lambda: rng.choice([0, rng.randint(50, 5000)]), UINT64))
    if rng.random() < 0.8:
        st.max_new_tokens = _pick(rng, lambda: rng.randint(1, 8), UINT32)
    return st


def _prompt(rng: random.Random, msg: pb.GenerateRequest) -> None:
    if rng.random() < 0.3:
        roles = lambda: rng.choice(["user", "system", "assistant"])   # noqa: E731
        messages = [pb.ChatMessage(role=_pick(rng, roles, ROLES), content=_text(rng))
                    for _ in range(_pick(rng, lambda: rng.randint(1, 3), [0, 40]))]
        msg.messages.CopyFrom(pb.ChatMessages(messages=messages))
    elif rng.random() > EDGE:   # else no prompt at all
        msg.text = _text(rng) or "Hello"


def random_request(rng: random.Random) -> pb.GenerateRequest:
    """A GenerateRequest with each field mostly plausible, now and then at an edge of its wire type."""
    response = pb.ResponseOptions(token_logprobs=rng.random() < 0.5,
                                  top_n_tokens=_pick(rng, lambda: rng.randint(0, 5), UINT32))
    msg = pb.GenerateRequest(params=pb.Parameters(sampling=_sampling(rng), stopping=_stopping(rng),
                                                  response=response),
                             truncate_input_tokens=_pick(rng, lambda: rng.choice([0, rng.randint(1, 8)]), UINT32))
    if rng.random() < 0.3:
        msg.request_id = _text(rng)
    if rng.random() < EDGE:
        msg.adapter_id = _text(rng)
    _prompt(rng, msg)
    return msg


def random_bytes(rng: random.Random) -> bytes:
    """Request bytes that are often not a valid message: a good one truncated, flipped or spliced, or
    hand-made wire data (bad varints, wrong wire types, strings that are not UTF-8, deep groups)."""
    good = random_request(rng).SerializeToString()
    kind = rng.randrange(6)
    if kind == 0 and good:
        return good[:rng.randrange(len(good))]
    if kind == 1 and good:
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if kind == 3:   # field 1..6 as a length-delimited string of bytes that are not UTF-8
        field = rng.randint(1, 6)
        junk = bytes([rng.choice([0xFF, 0xC0, 0x80, 0xED]), rng.randrange(256)])
        return bytes([field << 3 | 2, len(junk)]) + junk
    if kind == 4:   # a known field with the wrong wire type, or a varint never finished
        return rng.choice([b"\x08\xff", b"\x1d\x01\x02\x03\x04", b"\x1a\xff\xff\xff\xff\x0f", b"\x2a\x05\x0a"])
    return b"\x0b" * rng.randint(1, 200)   # nested start-group tags, never ended


FINISHED = {pb.MAX_TOKENS, pb.EOS_TOKEN, pb.STOP_SEQUENCE, pb.TIME_LIMIT, pb.TOKEN_LIMIT}


def verdict(method: str, code: grpc.StatusCode, response) -> str | None:
    """None when the answer is acceptable, else what is wrong with it."""
    if code in BUGS:
        return f"{method} answered {code.name}"
    if code is not grpc.StatusCode.OK or not method.startswith(GENERATION + "Generate"):
        return None
    if isinstance(response, list):   # a stream's chunks: the last one says how it ended
        if not response:
            return f"{method} answered OK with no chunks"
        response = response[-1]
    if response.stop_reason not in FINISHED:
        return f"{method} answered OK ending with stop reason {pb.StopReason.Name(response.stop_reason)}"
    return None


def call(channel: grpc.Channel, method: str, payload, timeout: float = 60):
    """(status code, response: a message, a list of chunks, or the details) of one call; payload is a
    message or raw bytes."""
    raw = payload if isinstance(payload, bytes) else payload.SerializeToString()
    parse = pb.GenerateResponse.FromString if method.startswith(GENERATION + "Generate") else None
    try:
        if method in STREAMING:
            chunks = list(channel.unary_stream(method, response_deserializer=parse)(raw, timeout=timeout))
            return grpc.StatusCode.OK, chunks
        return grpc.StatusCode.OK, channel.unary_unary(method, response_deserializer=parse)(raw, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def random_case(rng: random.Random, methods: list[str]) -> tuple[str, object]:
    if rng.random() < 0.6:
        return rng.choice([GENERATION + "Generate", GENERATION + "GenerateStream"]), random_request(rng)
    return rng.choice(methods), random_bytes(rng)


def run(target: str, n: int, seed: int = 0, methods: list[str] = METHODS) -> list[str]:
    """Runs n seeded cases against target; returns what went wrong (empty = all well)."""
    rng, problems = random.Random(seed), []
    with grpc.insecure_channel(target) as channel:
        for i in range(n):
            method, payload = random_case(rng, methods)
            code, response = call(channel, method, payload)
            problem = verdict(method, code, response)
            if problem:
                problems.append(f"case {i} (seed {seed}): {problem}: {response!r:.300} for {payload!r:.300}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", default="", help="host:port; empty = start a server on a tiny random model")
    args = parser.parse_args(argv)
    logging.getLogger("loraplex.requests").setLevel(logging.WARNING)   # one line per case otherwise
    server = None if args.target else _tiny_server()
    try:
        problems = run(args.target or server.target, args.n, args.seed)
    finally:
        if server is not None:
            server.close()
    print("\n".join(problems) or f"{args.n} cases, all answered well")
    return 1 if problems else 0


def fuzz_server(model_dir, adapters_dir):
    """A server for fuzzing: both services, and limits that keep every accepted request short."""
    from servers import ServerThread

    return ServerThread(model=str(model_dir), kv_cache_mb=16, max_new_tokens=16, default_max_new_tokens=8,
                        adapter_roots=str(adapters_dir))


def _tiny_server():
    import pathlib
    import tempfile

    from servers import make_tiny_model

    scratch = pathlib.Path(tempfile.mkdtemp(prefix="loraplex-fuzz-"))
    (scratch / "adapters").mkdir()
    return fuzz_server(make_tiny_model(scratch / "model"), scratch / "adapters")


if __name__ == "__main__":
    sys.exit(main())
