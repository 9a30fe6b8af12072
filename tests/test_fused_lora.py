"""The fused LoRA kernel (all targets of a packed module in one launch, adapters/triton_ops.fused) under
Triton's CPU interpreter: equal, bit for bit, to the two kernels per target, and close to plain float64
arithmetic; and ops.lora_apply's two-op path (the one taken off CUDA) against lora_shrink + lora_expand.
tests/test_cuda.py runs the same comparisons compiled on a GPU."""

import math
import os

import pytest
import torch

from loraplex.adapters import ops
from loraplex.adapters.segments import compute_segments

assert os.environ.get("TRITON_INTERPRET") == "1", "these tests need Triton's CPU interpreter"
triton_ops = pytest.importorskip("loraplex.adapters.triton_ops")
if not triton_ops.available():
    pytest.fail("triton is not installed (pip install -e '.[test]')", pytrace=False)

RANKS = [4, 16, 0, 9]          # per slot; 0 = the adapter does not touch this target
MAX_RANK = 16
IN = 40                        # not a multiple of the kernel's input block
OUTS = [48, 16, 16]            # a packed q|k|v-like output
LAYOUTS = {"decode": ([0, -1, 1, 3, 2, 1], [1] * 6), "prefill": ([3, -1, 0], [3, 2, 4])}


def module(n_targets: int, dtype, gen):
    """Per target (a [slots, R, in], b [slots, n, R], ranks [slots], offset, n); NaN past each rank."""
    targets, offset = [], 0
    for n in OUTS[:n_targets]:
        a = torch.full((len(RANKS), MAX_RANK, IN), float("nan"))
        b = torch.full((len(RANKS), n, MAX_RANK), float("nan"))
        for s, r in enumerate(RANKS):
            a[s, :r] = torch.randn(r, IN, generator=gen) / math.sqrt(IN)
            b[s, :, :r] = torch.randn(n, r, generator=gen) / math.sqrt(max(r, 1))
        targets.append((a.to(dtype), b.to(dtype), torch.tensor(RANKS), offset, n))
        offset += n
    return targets, offset


def plain(x, targets, token_slots, base):
    out = base.double().clone()
    for a, b, ranks, offset, n in targets:
        for t, s in enumerate(token_slots):
            r = int(ranks[s]) if s >= 0 else 0
            if r:
                y = (a[s, :r].double() @ x[t].double()).to(x.dtype).double()   # the shrink, in x's dtype
                out[t, offset:offset + n] += b[s, :, :r].double() @ y
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_targets", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_fused_kernel_equals_two_kernels_and_plain_arithmetic(layout, n_targets, dtype):
    gen = torch.Generator().manual_seed(n_targets)
    targets, width = module(n_targets, dtype, gen)
    segments = compute_segments(*LAYOUTS[layout])
    x = torch.randn(segments.num_tokens, IN, generator=gen).to(dtype)
    base = torch.randn(segments.num_tokens, width + 8, generator=gen).to(dtype)   # 8 columns no target owns

    args = triton_ops.fused_args(targets)
    assert args is not None
    fused = triton_ops.fused(x, args, segments.token_slots, base.clone())
    two = base.clone()
    for a, b, ranks, offset, n in targets:
        y = triton_ops.shrink(x, a, segments.token_slots, ranks, torch.zeros(x.shape[0], MAX_RANK, dtype=dtype))
        triton_ops.expand(y, b, segments.token_slots, ranks, two[:, offset:offset + n])
    assert torch.equal(fused, two)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused.double(), plain(x, targets, segments.token_slots.tolist(), base),
                               atol=atol, rtol=atol)
    assert torch.equal(fused[:, width:], base[:, width:])


def test_fused_args_refuse_what_one_launch_cannot_hold():
    gen = torch.Generator().manual_seed(0)
    targets, _ = module(3, torch.float32, gen)
    assert triton_ops.fused_args(targets + targets[:1]) is None          # four targets
    a, b, ranks, offset, n = targets[1]
    assert triton_ops.fused_args([targets[0], (a[:, :8], b, ranks, offset, n)]) is None   # other A layout


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_lora_apply_without_fusion_is_shrink_then_expand_per_target(dtype, layout):
    """Off CUDA: the native one-call path (float32 CPU) or the two ops per target, bit for bit the ops."""
    gen = torch.Generator().manual_seed(3)
    targets, width = module(3, dtype, gen)
    targets = [(torch.nan_to_num(a), torch.nan_to_num(b), r, o, n) for a, b, r, o, n in targets]
    segments = compute_segments(*LAYOUTS[layout])
    x = torch.randn(segments.num_tokens, IN, generator=gen).to(dtype)
    out = torch.randn(segments.num_tokens, width, generator=gen).to(dtype)
    want = out.clone()
    shrunk = torch.zeros(x.shape[0], MAX_RANK, dtype=dtype)
    for a, b, ranks, offset, n in targets:
        ops.lora_shrink(x, a, segments, ranks, shrunk)
        ops.lora_expand(shrunk, b, segments, ranks, want, out_slice=(offset, n))
    assert torch.equal(ops.lora_apply(x, targets, segments, out), want)
