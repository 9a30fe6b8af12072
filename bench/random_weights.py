"""Random weights for a checkpoint directory that has everything but its weights: `python -m
loraplex.bench.random_weights [DIR]` (default: the embedded model's directory in the cache).

For timing runs on machines where the embedded model's package cannot be installed: the config, tokenizer
and conversion marker are copied there, and this writes model.safetensors of the config's shape with
random values (transformers' own initialization, fixed seed). Speed does not depend on the values; the
generated text is meaningless.
"""

import argparse
import pathlib
import sys

import torch


def write_random_weights(model_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()
               if not (tied and name == "lm_head.weight")}   # shares the embedding's storage
    path = model_dir / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "random_weights_seed": str(seed)})
    return path


def main(argv=None) -> int:
    from loraplex.server.config import ServerConfig
    from loraplex.server.model.store import DEFAULT_NAME

    p = argparse.ArgumentParser(prog="python -m loraplex.bench.random_weights", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", nargs="?", help="[default: <cache>/models/SmolLM2-135M-Instruct]")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model_dir = pathlib.Path(args.model_dir or pathlib.Path(ServerConfig().resolved_cache_dir()) / "models" / DEFAULT_NAME)
    print("wrote", write_random_weights(model_dir, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
