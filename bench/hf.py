"""The peer: Hugging Face transformers `generate` on the same NF4 base (bitsandbytes Linear4bit layers),
greedy, with a streamer that only timestamps each generated token."""

import time

import torch

from .workload import OnlineRequest, last_tokens, summarize


def load(directory: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The NF4 model on `device` (cpu or cuda[:N]), `dtype` as the compute dtype and that of the other weights."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    device = torch.device(device)
    place = {} if device.type == "cpu" else {"device_map": {"": device.index or 0}}
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, dtype=dtype, **place).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


class TimingStreamer:
    """generate() calls put() once with the prompt, then once per step with the new tokens."""

    def __init__(self):
        self.calls: list[float] = []

    def put(self, value) -> None:
        self.calls.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def token_times(self) -> list[float]:
        return self.calls[1:]


def generate_timed(model, tokenizer, id_lists: list[list[int]], new_tokens: int) -> list[float]:
    """Runs one left-padded batch for exactly new_tokens steps; returns the time of each step's tokens."""
    width = max(len(ids) for ids in id_lists)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in id_lists], device=model.device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in id_lists], device=model.device)
    streamer = TimingStreamer()
    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                       pad_token_id=pad, streamer=streamer)
    if len(streamer.token_times) != new_tokens:
        raise RuntimeError(f"generate made {len(streamer.token_times)} steps, expected {new_tokens}")
    return streamer.token_times


def decode_tokens_per_s(model, tokenizer, prompts: list[str], prompt_tokens: int, new_tokens: int) -> float:
    """Same definition as ours: B * (N - 1) / (first token -> last token)."""
    ids = [last_tokens(tokenizer, p, prompt_tokens) for p in prompts]
    times = generate_timed(model, tokenizer, ids, new_tokens)
    return len(prompts) * (new_tokens - 1) / (times[-1] - times[0])


def online(model, tokenizer, stream: list[OnlineRequest], batch_size: int) -> dict:
    """Static batches in arrival order: a batch starts once its last member has arrived and the previous
    batch is done, and runs to its longest member's length. Waiting is done on a virtual clock (the model
    would sit idle); generate itself runs for real and its timings are placed on that clock."""
    from loraplex.server.engine.prompt import encode_prompt

    clock, token_times, wasted = 0.0, [], 0
    for k in range(0, len(stream), batch_size):
        group = stream[k:k + batch_size]
        start = max(clock, group[-1].arrival)
        longest = max(r.output_len for r in group)
        called = time.perf_counter()
        times = generate_timed(model, tokenizer, [encode_prompt(tokenizer, r.prompt) for r in group], longest)
        placed = [start + t - called for t in times]
        token_times += [placed[:r.output_len] for r in group]
        wasted += sum(longest - r.output_len for r in group)
        clock = start + time.perf_counter() - called
    arrivals = [r.arrival for r in stream]
    result = summarize(arrivals, token_times)
    result["wasted_tokens"] = wasted
    result["ttft_s"] = [ts[0] - a for a, ts in zip(arrivals, token_times)]
    return result
