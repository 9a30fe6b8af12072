"""What one request may ask of the engine: prompt length, new tokens, and room in the KV cache."""

from dataclasses import dataclass

from ..errors import InvalidArgumentError, ResourceExhaustedError


@dataclass(frozen=True)
class EngineLimits:
    max_sequence_length: int
    max_new_tokens: int
    max_prompt_tokens: int = 0            # 0 = only the context window limits a prompt

    def check(self, ids: list[int], request, kv_capacity: int) -> None:
        """Raises the error naming the field at fault when the encoded prompt `ids` and the request's
        max_new_tokens exceed a limit; kv_capacity is the whole KV cache, in tokens."""
        window = self.max_sequence_length
        if not ids:
            raise InvalidArgumentError("prompt", "the prompt encodes to no tokens")
        limit = self.max_prompt_tokens
        if limit and len(ids) > limit:
            raise InvalidArgumentError(
                "text", f"the prompt has {len(ids)} tokens but this server accepts at most {limit} "
                        f"(max_prompt_tokens); shorten it or set truncate_input_tokens")
        if len(ids) >= window:
            raise InvalidArgumentError(
                "text", f"the prompt has {len(ids)} tokens but the context window is {window}; "
                        f"shorten it or set truncate_input_tokens")
        new_tokens = request.stopping.max_new_tokens
        if new_tokens > self.max_new_tokens:
            raise InvalidArgumentError("max_new_tokens",
                                       f"must be <= {self.max_new_tokens}, got {new_tokens}")
        if min(len(ids) + new_tokens, window) > kv_capacity:
            raise ResourceExhaustedError(f"prompt + max_new_tokens needs more than the whole KV cache "
                                         f"({kv_capacity} tokens)")
