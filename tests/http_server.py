"""What the HTTP API tests share: tiny adapters, a server with both transports, and its base URL."""

import pathlib

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from servers import ServerThread

ADAPTERS = {"small": (4, ["q_proj", "v_proj"]), "team/all": (8, ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"])}


def make_adapters(base_dir: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
    for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(30 + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(
            r=rank, lora_alpha=16, target_modules=targets, init_lora_weights=False))
        for p in model.parameters():      # deltas big enough that an adapter changes the answer
            if p.requires_grad:
                p.data *= 20
        model.save_pretrained(root / name)
    return root


def http_server(model_dir, root=None, **config) -> ServerThread:
    config.setdefault("kv_cache_mb", 16)
    config.setdefault("max_batch_size", 8)
    if root is not None:
        config.setdefault("adapter_roots", str(root))
    return ServerThread(model=str(model_dir), **config)


def base_url(server: ServerThread, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{server.running.http.port}"
