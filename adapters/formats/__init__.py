"""Adapter formats, each read at the edge into the canonical form (`canonical.py`).

`read_adapter` looks at adapter_config.json's peft_type and hands the directory to that format's module;
everything the formats share (files, tensor names, shape and value checks) is in `peft_files.py`.
"""

from pathlib import Path

import torch

from loraplex.adapters.canonical import Adapter
from loraplex.server.model.config import ModelConfig

from . import adalora, lora
from .dora import bind
from .peft_files import CONFIG_FILE, AdapterFormatError, AdapterTooLarge, factor_elements, read_config

READERS = {"LORA": lora.read, "ADALORA": adalora.read}

__all__ = ["AdapterFormatError", "AdapterTooLarge", "bind", "factor_elements", "read_adapter"]


def read_adapter(adapter_dir: Path, adapter_id: str, model: ModelConfig, max_rank: int,
                 dtype: torch.dtype = torch.float32, keep_16bit: bool = False) -> Adapter:
    """Reads and validates one adapter directory against the base model's shapes. DoRA adapters come back
    with `needs_base` set: `bind` them to the base weights before serving. keep_16bit: factors saved in
    bfloat16 or float16 stay so, with their scaling beside them (`LoraModule.b_scale`), where the format
    does no arithmetic on them (LoRA, rsLoRA, patterns, DoRA; not AdaLoRA or QA-LoRA)."""
    adapter_dir = Path(adapter_dir)
    config = read_config(adapter_dir)
    peft_type = config.get("peft_type")
    reader = READERS.get(peft_type)
    if reader is None:
        raise AdapterFormatError(f"{CONFIG_FILE}: peft_type {peft_type!r} is not supported (supported: "
                                 f"{', '.join(READERS)})")
    return reader(adapter_dir, adapter_id, config, model, max_rank, dtype, keep_16bit)
