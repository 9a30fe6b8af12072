"""Test helpers: tiny random checkpoints and an in-process server on its own event-loop thread."""

import asyncio
import pathlib
import shutil
import threading

import torch

from loraplex.server.config import ServerConfig
from loraplex.server.main import shutdown, start
from loraplex.server.model.store import embedded_model_dir


def make_tiny_model(path: pathlib.Path, arch: str = "llama", seed: int = 0, **overrides) -> pathlib.Path:
    """A random 2-layer model using the embedded model's tokenizer, saved as an HF checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    shape = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    shape.update(overrides)
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    model = model_cls(config_cls(**shape))
    model.save_pretrained(path)
    source = embedded_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    return path


def save_foreign_adapter(path: pathlib.Path, scratch: pathlib.Path) -> pathlib.Path:
    """A PEFT adapter made on another tiny base (other shapes): valid files that our base cannot serve."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    other = make_tiny_model(scratch, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    get_peft_model(AutoModelForCausalLM.from_pretrained(other),
                   LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(path)
    return path


class ServerThread:
    """A real gRPC server in this process, so tests can look at its engine."""

    def __init__(self, **config):
        config.setdefault("port", 0)
        config.setdefault("metrics_port", 0)
        config.setdefault("http_port", 0)
        self.config = ServerConfig(**config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = self._call(start(self.config), timeout=300)
        self.engine = self.running.engine
        self.target = f"127.0.0.1:{self.running.port}"

    def _call(self, coro, timeout):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self._call(shutdown(self.running, grace=0), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
