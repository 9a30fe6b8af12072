"""Our direct call of bitsandbytes' fused CPU kernel gives bitwise the numbers of bitsandbytes' own
Linear4bit module (the oracle), with and without bias, for one row and many."""

import pytest
import torch

from loraplex.server.model import nf4_cpu
from loraplex.server.model.nf4 import NF4Backend


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_kernel_matches_linear4bit_bitwise(rows, bias):
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 128, generator=g) * 0.05
    b = torch.randn(96, generator=g) if bias else None
    ours = NF4Backend().quantize(weight, b, torch.device("cpu"), torch.float32)
    if not isinstance(ours, nf4_cpu.FusedNF4Linear):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes' Linear4bit itself is used")
    reference = bnb.nn.Linear4bit(128, 96, bias=bias, compute_dtype=torch.float32, quant_type="nf4",
                                  compress_statistics=False)
    reference.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=64, quant_type="nf4",
                                         compress_statistics=False)
    if bias:
        reference.bias = torch.nn.Parameter(b.clone(), requires_grad=False)
    reference = reference.to("cpu").eval()
    x = torch.randn(rows, 128, generator=g)
    with torch.inference_mode():
        assert torch.equal(ours(x), reference(x))
