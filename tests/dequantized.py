"""The oracle of a base quantized by a format no HF model reads: HF transformers' float model of the same
checkpoint, each decoder linear given the weight our backend's module multiplies by."""

import torch
from transformers import AutoModelForCausalLM

from loraplex.server.model import layout
from loraplex.server.model.loader import dense_weight, load_model


def float_model_of(path, backend, ours=None):
    """HF's float32 model of the checkpoint at `path` on our dequantized weights (`ours`: our model of it
    with `backend`, loaded here when not given; quantizing is deterministic, so any load of it will do)."""
    ours = load_model(path, torch.device("cpu"), torch.float32, backend) if ours is None else ours
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for index, layer in enumerate(ours.model.layers):
        for packed in layout.PACKED:
            dense = dense_weight(layer.get_submodule(packed), backend)
            for (_, offset, size), name in zip(layout.slices(ours.config, packed), layout.checkpoint_paths(packed)):
                with torch.no_grad():
                    hf.model.layers[index].get_submodule(name).weight.copy_(dense[offset:offset + size])
    return hf
