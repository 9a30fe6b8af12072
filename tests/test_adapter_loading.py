"""PEFT LoRA adapters read into the canonical form, with PEFT itself as the oracle, and every refusal."""

import json
import os
import re
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from loraplex.adapters.ids import AdapterNotFound, InvalidAdapterId, resolve_adapter_dir, validate_adapter_id
from loraplex.adapters.formats import AdapterFormatError, AdapterTooLarge, read_adapter
from loraplex.server.model.config import ModelConfig
from loraplex.server.model.layout import TARGETS
from servers import make_tiny_model

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("lora-base"))


@pytest.fixture(scope="module")
def base_config(base_dir):
    return ModelConfig.from_hf(AutoModelForCausalLM.from_pretrained(base_dir).config)


def make_adapter(base_dir, out_dir, r=4, alpha=8, targets=("q_proj", "v_proj"), seed=1):
    """A PEFT model with random (non-zero) A and B, saved as an adapter; returns the PEFT model too."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    target_modules = targets if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    return peft_model


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters") / "plain"
    make_adapter(base_dir, out)
    return out


@pytest.fixture()
def broken(adapter_dir, tmp_path):
    """A fresh copy of the good adapter, for a test to break."""
    return shutil.copytree(adapter_dir, tmp_path / "broken")


def peft_deltas(peft_model) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, target): delta_W [out, in]} as PEFT itself computes it."""
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
            deltas[(layer, name.rsplit(".", 1)[-1])] = module.get_delta_weight("default").detach()
    return deltas


# --- PEFT as the oracle -------------------------------------------------------------------------------

@pytest.mark.parametrize("r, alpha, targets", [
    (4, 8, ("q_proj", "v_proj")),
    (16, 32, TARGETS),
    (64, 16, ("o_proj", "gate_proj", "up_proj", "down_proj")),
    (8, 8, r".*\.(k_proj|down_proj)"),  # target_modules as a regex string
])
def test_matches_peft_delta(base_dir, base_config, tmp_path, r, alpha, targets):
    peft_model = make_adapter(base_dir, tmp_path / "a", r=r, alpha=alpha, targets=targets)
    adapter = read_adapter(tmp_path / "a", "org/a", base_config, max_rank=64)
    expected = peft_deltas(peft_model)
    assert set(adapter.modules) == set(expected)  # untargeted modules are absent
    for key, delta in expected.items():
        module = adapter.modules[key]
        assert module.a.shape[0] == r and module.b.shape[1] == r
        torch.testing.assert_close(module.b @ module.a, delta, rtol=1e-5, atol=1e-6)
    wanted = {t for _, t in expected}
    assert adapter.target_modules == tuple(sorted(wanted))
    assert adapter.rank == r and set(adapter.ranks.values()) == {r}
    assert adapter.alpha == alpha and adapter.format == "lora" and adapter.adapter_id == "org/a"
    assert adapter.size_bytes == sum(m.a.nbytes + m.b.nbytes for m in adapter.modules.values())
    assert adapter.layers == (0, 1)


def test_dtype_is_applied(adapter_dir, base_config):
    adapter = read_adapter(adapter_dir, "a", base_config, max_rank=8, dtype=torch.bfloat16)
    module = next(iter(adapter.modules.values()))
    assert module.a.dtype == module.b.dtype == torch.bfloat16
    assert module.magnitude is None and module.group_size is None


# --- id validation and resolution ---------------------------------------------------------------------

@pytest.mark.parametrize("adapter_id, words", [
    ("", "empty"),
    (".", "'.' segment"),
    ("..", "'..' segment"),
    ("../x", "'..' segment"),
    ("org/../x", "'..' segment"),
    ("org/./x", "'.' segment"),
    ("/etc/passwd", "absolute"),
    ("org//x", "empty segment"),
    ("org/", "empty segment"),
    ("a\\b", "backslash"),
    ("..\\x", "backslash"),
    ("a\x00b", "NUL"),
    ("%2e%2e", "percent"),
    ("%2e%2e/x", "percent"),
    ("my adapter", "whitespace"),
    ("a\tb", "whitespace"),
    ("a\nb", "whitespace"),
    ("a:b", "characters outside"),
    ("~/x", "characters outside"),
    ("x" * 201, "longer than 200"),
])
def test_invalid_ids(tmp_path, adapter_id, words):
    with pytest.raises(InvalidAdapterId, match=re.escape(words)):
        resolve_adapter_dir(adapter_id, [tmp_path])


@pytest.mark.parametrize("adapter_id", ["a", "org/name", "Org.v1/name_2-x", "a.b", "..a", "x" * 200])
def test_valid_ids(adapter_id):
    assert "/".join(validate_adapter_id(adapter_id)) == adapter_id


def test_resolves_inside_roots(tmp_path):
    first, second = tmp_path / "r1", tmp_path / "r2"
    (first / "a").mkdir(parents=True)
    (second / "org" / "b").mkdir(parents=True)
    assert resolve_adapter_dir("a", [first, second]) == (first / "a").resolve()
    assert resolve_adapter_dir("org/b", [first, second]) == (second / "org" / "b").resolve()
    with pytest.raises(AdapterNotFound, match="'org/c' not found"):
        resolve_adapter_dir("org/c", [first, second])


def test_symlink_out_of_root_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    (outside / "secret").mkdir(parents=True)
    os.symlink(outside / "secret", root / "evil")
    os.symlink(outside, root / "org")  # a namespace directory that points out
    (root / "real").mkdir()
    os.symlink(root / "real", root / "alias")  # a link that stays inside is fine
    for adapter_id in ("evil", "org/secret"):
        with pytest.raises(InvalidAdapterId, match="outside its adapter root"):
            resolve_adapter_dir(adapter_id, [root])
    assert resolve_adapter_dir("alias", [root]) == (root / "real").resolve()


# --- refusals -----------------------------------------------------------------------------------------

def edit_config(path, **changes):
    config = json.loads((path / CONFIG).read_text())
    config.update(changes)
    (path / CONFIG).write_text(json.dumps(config))


def edit_tensors(path, change):
    tensors = load_file(path / WEIGHTS)
    change(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def assert_refused(path, config, words, max_rank=64, error=AdapterFormatError):
    with pytest.raises(error, match=re.escape(words)):
        read_adapter(path, "a", config, max_rank=max_rank)


def test_missing_config(broken, base_config):
    (broken / CONFIG).unlink()
    assert_refused(broken, base_config, f"{CONFIG} is missing")


def test_invalid_json(broken, base_config):
    (broken / CONFIG).write_text('{"peft_type": "LORA", "r": ')
    assert_refused(broken, base_config, f"{CONFIG} is not valid JSON")


def test_non_object_config(broken, base_config):
    (broken / CONFIG).write_text("[1, 2]")
    assert_refused(broken, base_config, "JSON object")


@pytest.mark.parametrize("field, value, words", [
    ("peft_type", "LOHA", "peft_type 'LOHA' is not supported (supported: LORA, ADALORA)"),
    ("peft_type", None, "peft_type None is not supported"),
    ("modules_to_save", ["lm_head"], "modules_to_save=['lm_head'] refused"),
    ("bias", "all", "bias='all' refused: trained bias terms are not supported"),
    ("bias", "lora_only", "bias='lora_only' refused"),
    ("lora_bias", True, "lora_bias=True refused: LoRA bias terms are not supported"),
    ("trainable_token_indices", [3, 5], "trainable_token_indices (embedding changes) is not supported"),
    ("use_rslora", True, None),            # accepted: the scale changes, nothing is refused
    ("rank_pattern", {"q_proj": 8}, "rank of lora_A (4, 64) / lora_B (64, 4) differs from the config's "
                                    "rank_pattern['q_proj']=8"),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern['q_proj'] must be a positive integer"),
    ("alpha_pattern", {"(": 8}, "alpha_pattern key '(' is not a valid pattern"),
    ("alpha_pattern", [8], "alpha_pattern must be an object"),
    ("r", 0, "r must be a positive integer"),
    ("lora_alpha", "big", "lora_alpha must be a finite number"),
    ("target_modules", ["k_proj"], "not selected by adapter_config.json target_modules"),
    ("layers_to_transform", [1], "not in adapter_config.json layers_to_transform"),
])
def test_config_fields_refused(broken, base_config, field, value, words):
    edit_config(broken, **{field: value})
    if words is None:
        read_adapter(broken, "a", base_config, max_rank=64)
    else:
        assert_refused(broken, base_config, words)


def test_pickled_bin_refused(broken, base_config):
    torch.save(load_file(broken / WEIGHTS), broken / "adapter_model.bin")
    (broken / WEIGHTS).unlink()
    assert_refused(broken, base_config, "adapter_model.bin refused: safetensors only")


def test_missing_weights(broken, base_config):
    (broken / WEIGHTS).unlink()
    assert_refused(broken, base_config, f"{WEIGHTS} is missing")


def test_truncated_safetensors(broken, base_config):
    data = (broken / WEIGHTS).read_bytes()
    (broken / WEIGHTS).write_bytes(data[: len(data) // 2])
    assert_refused(broken, base_config, f"{WEIGHTS} is corrupt or truncated")


def test_garbage_safetensors(broken, base_config):
    (broken / WEIGHTS).write_bytes(b"\xff" * 64)
    assert_refused(broken, base_config, f"{WEIGHTS} is corrupt or truncated")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_refused(broken, base_config, bad):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    edit_tensors(broken, lambda t: t[key].view(-1).__setitem__(3, bad))
    assert_refused(broken, base_config, "layer 1 v_proj lora_B: holds NaN or inf")


def test_adapter_for_another_hidden_size(base_config, tmp_path):
    other = make_tiny_model(tmp_path / "other", hidden_size=32, intermediate_size=96)
    make_adapter(other, tmp_path / "a")
    assert_refused(tmp_path / "a", base_config, "lora_A: shape (4, 32) does not fit the base model")


@pytest.mark.parametrize("module, words", [
    ("lm_head", "targets module 'lm_head' refused: embedding and output-head adapters are not supported"),
    ("model.embed_tokens", "targets module 'embed_tokens' refused: embedding and output-head adapters"),
    ("model.layers.0.self_attn.rotary", "targets module 'rotary', which the base model lacks"),
])
def test_target_the_base_lacks(broken, base_config, module, words):
    def add(tensors):
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(4, 64)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(64, 4)
    edit_tensors(broken, add)
    assert_refused(broken, base_config, words)


def test_embedding_adapter_refused(broken, base_config):
    """PEFT's embedding LoRA (lora_embedding_A/B on embed_tokens) is refused by name, never skipped."""
    def add(tensors):
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 49152)
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.zeros(64, 4)
    edit_tensors(broken, add)
    assert_refused(broken, base_config, "refused: embedding adapters are not supported")


def test_layer_out_of_range(broken, base_config):
    def add(tensors):
        for factor, shape in (("A", (4, 64)), ("B", (32, 4))):
            tensors[f"base_model.model.model.layers.7.self_attn.v_proj.lora_{factor}.weight"] = torch.zeros(shape)
    edit_tensors(broken, add)
    assert_refused(broken, base_config, "layer index 7 (v_proj) is out of range")


def test_missing_factor(broken, base_config):
    edit_tensors(broken, lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"))
    assert_refused(broken, base_config, "layer 0 q_proj has no lora_B")


def test_not_a_lora_tensor(broken, base_config):
    edit_tensors(broken, lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.lora_magnitude_vector",
                                                 torch.ones(3)))
    assert_refused(broken, base_config, "is not a lora_A / lora_B weight of a Linear")


def test_rank_above_max(base_dir, base_config, tmp_path):
    make_adapter(base_dir, tmp_path / "a", r=16, alpha=16)
    assert_refused(tmp_path / "a", base_config, "rank r=16 is above the maximum rank 8", max_rank=8,
                   error=AdapterTooLarge)
