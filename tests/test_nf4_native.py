"""Our NF4 kernel for CPUs without AVX512-BF16 (server/model/nf4_native.py) against bitsandbytes, the oracle:
it multiplies by exactly bitsandbytes' dequantized weight (torch.equal), its products are within float32
rounding of a float64 matmul by that weight, and each row's bits are its own: the same alone, in any batch,
at one thread, and from every instruction-set variant this CPU runs."""

import pytest
import torch

from loraplex.adapters import native
from loraplex.server.model import nf4_native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
ISAS = {"scalar": 1, "avx2": 2, "avx512": 3}


def linear4bit(weight: torch.Tensor, bias: torch.Tensor | None, blocksize: int = 64, nested: bool = False):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=bias is not None, compute_dtype=torch.float32,
                              quant_type="nf4", compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=blocksize, quant_type="nf4",
                                     compress_statistics=nested)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return layer.to("cpu").eval()      # moving quantizes; no forward has run, so nothing is repacked


def dequantized(layer) -> torch.Tensor:
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def supported_isas() -> list[int]:
    supported = [ISAS["scalar"]]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        supported.append(ISAS["avx2"])
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        supported.append(ISAS["avx512"])
    return supported


@pytest.fixture
def vector_cpu(monkeypatch):
    """As on a CPU with AVX-512, so that a test of a layer's own conditions passes on any CPU; which variant
    this CPU runs is tested on its own below."""
    monkeypatch.setattr(native, "tile_isa", lambda: ISAS["avx512"])


@pytest.mark.parametrize("out_features, in_features, blocksize, nested", [
    (96, 256, 64, False), (72, 128, 64, False), (40, 192, 32, False), (96, 256, 128, False), (64, 512, 64, True)])
def test_dense_weight_is_bitsandbytes_dequantization(out_features, in_features, blocksize, nested, vector_cpu):
    g = torch.Generator().manual_seed(out_features + in_features)
    layer = linear4bit(torch.randn(out_features, in_features, generator=g) * 0.05, None, blocksize, nested)
    assert nf4_native.available(layer)
    assert torch.equal(nf4_native.NativeNF4Linear(layer).dense_weight(), dequantized(layer))


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_products_are_within_float32_rounding_of_the_dequantized_matmul(rows, bias):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(72, 576, generator=g) * 0.05            # 72 rows: the last tile padded
    b = torch.randn(72, generator=g) if bias else None
    layer = linear4bit(weight, b)
    ours = nf4_native.NativeNF4Linear(layer)
    x = torch.randn(3, rows, 576, generator=g)
    reference = x.double() @ dequantized(layer).double().T + (0 if b is None else b.double())
    magnitude = x.double().abs() @ dequantized(layer).double().abs().T        # sum |x w| per output
    got = ours(x)
    assert got.shape == (3, rows, 72) and got.dtype == torch.float32
    assert torch.all((got.double() - reference).abs() <= 576 * 2**-24 * magnitude + 1e-6)
    with torch.inference_mode():                                   # what bitsandbytes' own module gives
        assert torch.allclose(got, layer(x), rtol=1e-5, atol=1e-5)


def test_a_rows_bits_do_not_depend_on_the_batch_threads_or_variant():
    g = torch.Generator().manual_seed(3)
    # 37 tiles: blocks of the loop (kBlockTiles), tile pairs and one single tile; 37 rows: several row groups
    ours = nf4_native.NativeNF4Linear(linear4bit(torch.randn(592, 1536, generator=g) * 0.05, None))
    x = torch.randn(37, 1536, generator=g)
    args = (ours.codes, ours.scales, ours.table)
    full = torch.ops.loraplex.nf4_linear(x, *args)
    for i in (0, 16, 36):
        assert torch.equal(torch.ops.loraplex.nf4_linear(x[i:i + 1], *args), full[i:i + 1])
    assert torch.equal(torch.ops.loraplex.nf4_linear(x[3:24], *args), full[3:24])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(torch.ops.loraplex.nf4_linear(x, *args), full)
    finally:
        torch.set_num_threads(threads)
    for isa in supported_isas():
        assert torch.equal(torch.ops.loraplex.nf4_linear(x, *args, isa), full), isa


def test_bad_arguments_are_refused_with_a_message():
    ours = nf4_native.NativeNF4Linear(linear4bit(torch.randn(32, 128) * 0.05, None))
    args = (ours.codes, ours.scales, ours.table)
    with pytest.raises(RuntimeError, match="x has 64 columns"):
        torch.ops.loraplex.nf4_linear(torch.randn(2, 64), *args)
    with pytest.raises(RuntimeError, match=r"x \[m, k\] float32"):
        torch.ops.loraplex.nf4_linear(torch.randn(2, 128, dtype=torch.float64), *args)
    with pytest.raises(RuntimeError, match="table"):
        torch.ops.loraplex.nf4_linear(torch.randn(2, 128), ours.codes, ours.scales, ours.table[:8])
    with pytest.raises(RuntimeError, match="isa 9 is not supported"):
        torch.ops.loraplex.nf4_linear(torch.randn(2, 128), *args, 9)


def test_only_float32_compute_on_unrepacked_nf4_runs_here(vector_cpu):
    layer = linear4bit(torch.randn(32, 128) * 0.05, None)
    assert nf4_native.available(layer)
    layer.compute_dtype = torch.bfloat16          # bitsandbytes would compute in bfloat16: not this kernel's numbers
    assert not nf4_native.available(layer)
    assert not nf4_native.available(torch.nn.Linear(128, 32))


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    pytest.skip("/proc/cpuinfo names no flags")


def test_the_best_variant_is_the_one_the_cpu_flags_allow():
    flags = cpu_flags()
    expected = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "scalar"
    assert native.tile_isa() == ISAS[expected]


def test_a_cpu_with_only_the_scalar_variant_keeps_the_library_paths(monkeypatch):
    """Without AVX2 the tile products would be about 10-40x slower than bitsandbytes' and torch's own paths."""
    from loraplex.server.model.lm_head import OutputHead
    from loraplex.server.model.nf4 import NF4Backend

    layer = linear4bit(torch.randn(32, 128) * 0.05, None)
    monkeypatch.setattr(native, "tile_isa", lambda: ISAS["avx2"])
    assert nf4_native.available(layer)
    monkeypatch.setattr(native, "tile_isa", lambda: ISAS["scalar"])
    assert not nf4_native.available(layer)
    weight = torch.randn(32, 128) * 0.05
    module = NF4Backend().quantize(weight, None, torch.device("cpu"), torch.float32)
    assert not isinstance(module, nf4_native.NativeNF4Linear)
    x = torch.randn(3, 128)
    assert torch.allclose(module(x), x @ dequantized(linear4bit(weight, None)).T, atol=1e-5)
    assert not OutputHead(torch.randn(64, 32)).tiles


def test_bf16_tiles_multiply_by_the_exact_widening_in_every_row_alone():
    """The output head's native screen (bf16_linear_cpu.cpp): float32 rows times a bfloat16 weight, within
    float32 rounding of float64 on the widened weight, each row's bits its own on every variant."""
    from loraplex.server.model.lm_head import bf16_tiles

    g = torch.Generator().manual_seed(5)
    weight = torch.randn(580, 576, generator=g)        # 37 tiles, the last one padded; pairs and blocks
    tiles = bf16_tiles(weight)
    x = torch.randn(21, 576, generator=g)
    full = torch.ops.loraplex.bf16_linear(x, tiles)[:, :580]
    widened = weight.to(torch.bfloat16).double()
    reference, magnitude = x.double() @ widened.T, x.double().abs() @ widened.abs().T
    assert torch.all((full.double() - reference).abs() <= 576 * 2**-24 * magnitude)
    for i in (0, 20):
        assert torch.equal(torch.ops.loraplex.bf16_linear(x[i:i + 1], tiles)[:, :580], full[i:i + 1])
    for isa in supported_isas():
        assert torch.equal(torch.ops.loraplex.bf16_linear(x, tiles, isa)[:, :580], full), isa
    with pytest.raises(RuntimeError, match="x has 64 columns, the weight 576"):
        torch.ops.loraplex.bf16_linear(torch.randn(2, 64), tiles)


def test_the_model_calls_our_kernel_unpadded_and_other_modules_padded():
    from loraplex.server.model.loader import StackedLinear
    from loraplex.server.model.row_padding import RowPadded

    ours = nf4_native.NativeNF4Linear(linear4bit(torch.randn(32, 128) * 0.05, None))
    assert not RowPadded(ours).pads and not RowPadded(StackedLinear([ours, ours])).pads
    assert RowPadded(torch.nn.Linear(128, 32)).pads and RowPadded(StackedLinear([ours, torch.nn.Linear(128, 8)])).pads
    x = torch.randn(3, 128)
    assert torch.equal(RowPadded(ours)(x), ours(x))
