"""What the `loraplex` command prints of a generation; shared by `generate` (cli.py) and `demo` (demo.py)."""

from .client import Generation
from .errors import LoraplexError


def print_stream(chunks) -> tuple[Generation, list]:
    """Prints chunk texts as they arrive; returns the last chunk (stop reason, counts) and all tokens."""
    last, tokens = None, []
    for chunk in chunks:
        print(chunk.text, end="", flush=True)
        tokens.extend(chunk.tokens)
        last = chunk
    print()
    if last is None:
        raise LoraplexError("the stream ended before its final message")
    return last, tokens


def summary(result: Generation) -> str:
    stop = f" stop_sequence={result.stop_sequence!r}" if result.stop_sequence else ""
    return (f"[{result.stop_reason}{stop} input_tokens={result.input_token_count} "
            f"generated_tokens={result.generated_token_count} seed={result.seed} request_id={result.request_id}]")
