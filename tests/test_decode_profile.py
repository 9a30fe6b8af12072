"""The decode profile sorts py-spy's samples by the part of the step they were in."""

import pathlib

import pytest

import loraplex.server
from loraplex.bench import decode_profile

ROOT = pathlib.Path(loraplex.server.__path__[0]).parent


def _frame(function: str, path: str, line: int = 1) -> str:
    return f"{function} ({ROOT / path}:{line})"


def test_samples_are_sorted_by_part(tmp_path):
    step = ["Thread.run (/usr/lib/python3.11/threading.py:982)", _frame("ModelRunner.step", "server/engine/runner.py")]
    torch_frame = "silu (/venv/lib/python3.11/site-packages/torch/nn/functional.py:2445)"
    samples = [
        (step + [_frame("FusedNF4Linear.forward", "server/model/nf4_cpu.py")], 40),
        (step + [_frame("NativeNF4Linear.forward", "server/model/nf4_native.py")], 10),
        (step + [_frame("MLP.forward", "server/model/llama.py"),                     # bitsandbytes' own module
                 "forward (bitsandbytes/nn/modules.py:600)"], 10),   # py-spy: relative to site-packages
        (step + [_frame("attend", "server/model/decode_attention.py")], 15),
        (step + [_frame("OutputHead.greedy", "server/model/lm_head.py")], 10),
        (step + ["lora_shrink (adapters/ops.py:100)", "__call__ (torch/_ops.py:1279)"], 3),   # relative: installed in place
        (step + [_frame("LoraLinear.add_delta", "adapters/lora_layer.py")], 2),
        (step + [_frame("MLP.forward", "server/model/llama.py"), torch_frame], 6),   # a torch frame inside
        (step + [_frame("_prepare_decode", "server/engine/runner.py")], 4),
        (["Engine._idle (x.py:1)"], 100),                                            # outside any step
    ]
    raw = tmp_path / "profile.txt"
    raw.write_text("".join(f"{';'.join(frames)} {n}\n" for frames, n in samples))
    shares = decode_profile.shares(str(raw))
    assert shares == pytest.approx({
        "4-bit matmuls": 0.60, "decode attention and KV cache": 0.15, "output head": 0.10,
        "LoRA kernels (the segmented shrink and expand)": 0.03,
        "LoRA layers' glue (step metadata, buffers, DoRA scales)": 0.02,
        "other model code (norms, rotary, MLP glue, residuals)": 0.06, decode_profile.REST: 0.04})
