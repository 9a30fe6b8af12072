"""What a client asks for, as plain validated values. Field names follow the gRPC API."""

import uuid
from dataclasses import dataclass, field

from ..errors import InvalidArgumentError


# Ranges in which the sampler's float32 arithmetic stays finite: logits are divided by the temperature and
# divided or multiplied by the penalty, so |logit| / 1e-4 and |logit| * 100 stay far below float32's 3.4e38,
# and no finite temperature turns a banned token's -inf into NaN (-inf / inf).
TEMPERATURE_RANGE = (1e-4, 100.0)
PENALTY_RANGE = (0.01, 100.0)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: int | None = None
    repetition_penalty: float = 1.0   # 1 = off

    def __post_init__(self):
        if not (self.temperature == 0 or TEMPERATURE_RANGE[0] <= self.temperature <= TEMPERATURE_RANGE[1]):
            raise InvalidArgumentError("temperature",
                                       f"must be 0 (greedy) or in [{TEMPERATURE_RANGE[0]}, {TEMPERATURE_RANGE[1]}], "
                                       f"got {self.temperature}")
        if not 0 <= self.top_k < 2**31:
            raise InvalidArgumentError("top_k", f"must be in [0, 2^31), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgumentError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not PENALTY_RANGE[0] <= self.repetition_penalty <= PENALTY_RANGE[1]:
            raise InvalidArgumentError("repetition_penalty",
                                       f"must be in [{PENALTY_RANGE[0]}, {PENALTY_RANGE[1]}], "
                                       f"got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidArgumentError("seed", f"must be in [0, 2^63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# Every step searches each running sequence's new text for its stop sequences on the engine thread: bounded.
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    stop_sequences: tuple[str, ...] = ()
    include_stop_sequence: bool = False
    time_limit_millis: int = 0        # 0 = none

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise InvalidArgumentError("max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InvalidArgumentError("min_new_tokens",
                                       f"must be in [0, max_new_tokens={self.max_new_tokens}], "
                                       f"got {self.min_new_tokens}")
        if any(not s for s in self.stop_sequences):
            raise InvalidArgumentError("stop_sequences", "must not contain an empty string")
        if len(self.stop_sequences) > MAX_STOP_SEQUENCES:
            raise InvalidArgumentError("stop_sequences", f"at most {MAX_STOP_SEQUENCES} are allowed")
        if any(len(s) > MAX_STOP_SEQUENCE_CHARS for s in self.stop_sequences):
            raise InvalidArgumentError("stop_sequences",
                                       f"each must be at most {MAX_STOP_SEQUENCE_CHARS} characters long")
        if self.time_limit_millis < 0:
            raise InvalidArgumentError("time_limit_millis", "must be >= 0")


@dataclass(frozen=True)
class ResponseOptions:
    token_logprobs: bool = False
    top_n_tokens: int = 0

    def __post_init__(self):
        if not 0 <= self.top_n_tokens <= 20:
            raise InvalidArgumentError("top_n_tokens", f"must be in [0, 20], got {self.top_n_tokens}")


# A request id is echoed in every streamed chunk and every log line: bounded, and printable in both.
MAX_REQUEST_ID_CHARS = 256


@dataclass(frozen=True)
class GenerationRequest:
    """prompt is text, or chat messages as [{"role": ..., "content": ...}]."""
    prompt: str | tuple[dict, ...]
    adapter_id: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    response: ResponseOptions = field(default_factory=ResponseOptions)
    truncate_input_tokens: int = 0
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self):
        if isinstance(self.prompt, str):
            if not self.prompt:
                raise InvalidArgumentError("prompt", "the prompt is empty")
        elif not self.prompt:
            raise InvalidArgumentError("prompt", "no messages given")
        if self.truncate_input_tokens < 0:
            raise InvalidArgumentError("truncate_input_tokens", "must be >= 0")
        if len(self.request_id) > MAX_REQUEST_ID_CHARS or not self.request_id.isprintable():
            raise InvalidArgumentError("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable characters "
                                                     f"(no control characters), got {self.request_id[:40]!r}")
