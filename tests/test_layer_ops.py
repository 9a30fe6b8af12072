"""The native RMSNorm and rotary (adapters/csrc/layer_ops_cpu.cpp) against torch's own expressions, the ones
server/model/llama.py computes elsewhere: rotary gives their bits exactly, RMSNorm their values to float32
rounding, and each row of RMSNorm its own bits whatever the batch."""

import pytest
import torch

from loraplex.adapters import native
from loraplex.server.model.llama import RMSNorm, apply_rotary

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")


def torch_rms_norm(x, weight, eps):
    norm = RMSNorm(x.shape[1], eps)
    norm.weight.data = weight
    with torch.enable_grad():          # the torch expression (the native call serves only outside autograd)
        return norm(x).detach()


@pytest.mark.parametrize("hidden", [576, 64, 100])
def test_rms_norm_is_torchs_to_rounding_and_each_rows_own(hidden):
    g = torch.Generator().manual_seed(hidden)
    x, weight = torch.randn(33, hidden, generator=g) * 3, torch.randn(hidden, generator=g)
    with torch.inference_mode():
        got = RMSNorm(hidden, 1e-5)
        got.weight.data = weight
        native_out = got(x)
        assert torch.equal(native_out, torch.ops.loraplex.rms_norm(x, weight, 1e-5))
        for i in (0, 17, 32):
            assert torch.equal(torch.ops.loraplex.rms_norm(x[i:i + 1], weight, 1e-5), native_out[i:i + 1])
    torch.testing.assert_close(native_out, torch_rms_norm(x, weight, 1e-5), rtol=4e-7, atol=1e-6)


def test_rotary_is_torchs_bits_on_a_packed_projection():
    g = torch.Generator().manual_seed(1)
    n, heads, kv_heads, dim = 7, 9, 3, 64
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=g)
    cos, sin = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    want = apply_rotary(qkv[:, :(heads + kv_heads) * dim].reshape(n, heads + kv_heads, dim), cos, sin)
    v_before = qkv[:, (heads + kv_heads) * dim:].clone()
    qk = qkv[:, :(heads + kv_heads) * dim].view(n, heads + kv_heads, dim)     # strided: rows of the packed output
    torch.ops.loraplex.rotary_(qk, cos, sin)
    assert torch.equal(qk, want)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim:], v_before)          # v untouched


def test_bad_arguments_are_refused_with_a_message():
    with pytest.raises(RuntimeError, match="weight \\[k\\] float32"):
        torch.ops.loraplex.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="x \\[n, k\\] float32"):
        torch.ops.loraplex.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8), 1e-5)
    with pytest.raises(RuntimeError, match="d even"):
        torch.ops.loraplex.rotary_(torch.randn(2, 3, 5), torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="cos, sin"):
        torch.ops.loraplex.rotary_(torch.randn(2, 3, 4), torch.randn(3, 4), torch.randn(2, 4))
