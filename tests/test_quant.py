"""The quantization backend against bitsandbytes (the oracle): the dense weight of a module the NF4 backend
made is bitsandbytes' own dequantization of the same weight quantized with the same settings, and
settings that cannot fit a model are refused, naming the setting and the width."""

import copy

import pytest
import torch
from transformers import LlamaConfig

from loraplex.server.model import nf4_cpu, nf4_native
from loraplex.server.model.config import ModelConfig
from loraplex.server.model.loader import RowPadded, StackedLinear, dense_weight
from loraplex.server.model.nf4 import NF4Backend
from loraplex.server.model.quant import make_backend

CPU = torch.device("cpu")


def oracle_dense(weight: torch.Tensor, blocksize: int, bf16_scales: bool) -> torch.Tensor:
    import bitsandbytes as bnb

    params = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=blocksize, quant_type="nf4",
                               compress_statistics=False).to("cpu")   # moving quantizes
    state = copy.copy(params.quant_state)
    if bf16_scales:   # bitsandbytes' repacking for its fused CPU kernel rounds the block scales to bfloat16
        state.absmax = state.absmax.to(torch.bfloat16).float()
    return bnb.functional.dequantize_4bit(params.data, state)


@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("fused", [False, True])
def test_nf4_dense_weight_is_bitsandbytes_dequantization(fused, blocksize, monkeypatch):
    if not fused:
        monkeypatch.setattr(nf4_cpu, "available", lambda layer: False)   # bitsandbytes' Linear4bit itself
        monkeypatch.setattr(nf4_native, "available", lambda layer: False)
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(blocksize)) * 0.05
    backend = NF4Backend(blocksize=blocksize)
    module = backend.quantize(weight, None, CPU, torch.float32)
    if fused and not isinstance(module, nf4_cpu.FusedNF4Linear):
        pytest.skip("this CPU has no AVX512-BF16: no fused kernel")
    assert torch.equal(backend.dense_weight(module), oracle_dense(weight, blocksize, bf16_scales=fused))


def test_dense_weight_undoes_row_padding_and_stacked_parts():
    backend = NF4Backend()
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(rows, 128, generator=g) for rows in (64, 32)]
    stacked = RowPadded(StackedLinear([backend.quantize(w, None, CPU, torch.float32) for w in parts]))
    expected = torch.cat([backend.dense_weight(part) for part in stacked.inner.parts])
    assert torch.equal(dense_weight(stacked, backend), expected)
    dense = torch.nn.Linear(4, 4)                       # a merged module kept dense: its own weight
    assert torch.equal(dense_weight(RowPadded(dense), backend), dense.weight.float())
    with pytest.raises(TypeError, match="Bilinear is not a module of the nf4 backend"):
        dense_weight(RowPadded(torch.nn.Bilinear(4, 4, 4)), backend)


@pytest.mark.parametrize("intermediate, blocksize, width", [(192, 128, 64), (96, 64, 96)])
def test_nf4_refuses_a_block_size_that_does_not_divide_a_width(intermediate, blocksize, width):
    model = ModelConfig.from_hf(LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_attention_heads=4,
                                            num_key_value_heads=2, num_hidden_layers=1, vocab_size=128))
    NF4Backend(blocksize=32).validate(model, CPU)
    with pytest.raises(ValueError, match=rf"quant_blocksize {blocksize} does not divide the layer width {width}"):
        NF4Backend(blocksize=blocksize).validate(model, CPU)
    NF4Backend(blocksize=blocksize).validate(model, torch.device("cuda"))   # its CUDA kernels take any width


def test_make_backend():
    assert make_backend() == NF4Backend(blocksize=64) and make_backend(blocksize=128).describe() == "nf4 block 128"
    with pytest.raises(ValueError, match="quantization 'int3' is not supported"):
        make_backend("int3")
