"""Every adapter kind read into the canonical form and served in one mixed batch, with PEFT as the oracle
(LoRA, QLoRA, rsLoRA, rank/alpha patterns, AdaLoRA, DoRA) and, for QA-LoRA, a direct computation of the
paper's definition: base(x) + s * B A pool(x)."""

import json
import re
import threading

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import adapter_kinds
from dequantized import float_model_of
from loraplex.adapters.formats import AdapterFormatError, bind, read_adapter
from loraplex.server.model.config import ModelConfig
from loraplex.server.model.quant import make_backend
from loraplex.v1 import generation_pb2 as pb
from servers import ServerThread

FACTOR = 20.0     # big enough deltas that each adapter changes the tiny model's answers
NEW = 6
QA_GROUP = 16
QA_TARGETS = ["q_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("kinds")
    adapter_kinds.make_all(tiny_model_dir, root, FACTOR)
    make_qalora(tiny_model_dir, root / "qalora")
    return root


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return ModelConfig.from_hf(AutoModelForCausalLM.from_pretrained(tiny_model_dir).config)


def make_qalora(base_dir, out, group=QA_GROUP, seed=7, flag=False):
    """Per the paper: lora_A [r, in / group] acts on the input averaged over groups of `group` features."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in QA_TARGETS:
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, module.in_features // group, generator=gen)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=gen) * 0.5
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": QA_TARGETS}
    if flag:
        config.update(use_qalora=True, qalora_group_size=group)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def nf4_base(base_dir):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.float32)


def qalora_direct(model, adapter_dir, group=QA_GROUP, pooled_times_groups=False):
    """Hooks adding s * B A pool(x) to each targeted linear of an HF model: the paper's QA-LoRA, computed
    directly from the files (pool = mean over groups of `group` consecutive input features; times the number
    of groups for PEFT's use_qalora)."""
    from safetensors.torch import load_file
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    for name, module in model.named_modules():
        key = f"base_model.model.{name}.lora_A.weight"
        if key in tensors:
            a, b = tensors[key], tensors[key.replace("lora_A", "lora_B")]

            def hook(mod, args, out, a=a, b=b):
                x = args[0]
                pooled = x.reshape(*x.shape[:-1], -1, group).mean(-1)
                if pooled_times_groups:
                    pooled = pooled * pooled.shape[-1]
                return out + scaling * (pooled @ a.T @ b.T)
            module.register_forward_hook(hook)
    return model


def oracle_logprobs(base_dir, root, adapter_id, ids, quant="nf4"):
    """Per-step log-probabilities of PEFT (or the direct QA-LoRA) on the base the server quantized: HF's own
    NF4 model, or for int4 the float model of our dequantized weights."""
    model = nf4_base(base_dir) if quant == "nf4" else float_model_of(base_dir, make_backend(quant, group_size=32))
    with adapter_kinds.dora_weights_before_packing(model), torch.inference_mode():
        if adapter_id == "qalora":
            model = qalora_direct(model, root / adapter_id)
        elif adapter_id:
            model = PeftModel.from_pretrained(model, root / adapter_id)
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


# ---- reading: the canonical form equals PEFT's own delta weights -------------------------------------------

def peft_model(base_dir, adapter_dir):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()


def peft_modules(model):
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            yield (int(re.search(r"layers\.(\d+)\.", name).group(1)), name.rsplit(".", 1)[-1]), module


@pytest.mark.parametrize("kind", ["lora", "qlora", "rslora", "patterns", "adalora"])
def test_delta_weights_equal_peft(tiny_model_dir, root, config, kind):
    adapter = read_adapter(root / kind, kind, config, max_rank=64)
    expected = {key: m.get_delta_weight("default").detach() for key, m in peft_modules(peft_model(tiny_model_dir,
                                                                                                   root / kind))}
    if kind == "adalora":      # modules pruned to rank 0 add nothing and are dropped
        expected = {k: d for k, d in expected.items() if d.abs().max() > 0}
    assert set(adapter.modules) == set(expected)
    for key, delta in expected.items():
        torch.testing.assert_close(adapter.modules[key].delta_weight(), delta, rtol=1e-4, atol=1e-5)


def test_patterns_and_rslora_scales(root, config):
    patterns = read_adapter(root / "patterns", "p", config, max_rank=64)
    assert patterns.modules[(0, "q_proj")].rank == 4 and patterns.modules[(1, "q_proj")].rank == 4
    assert patterns.modules[(1, "down_proj")].rank == 12 and patterns.modules[(0, "down_proj")].rank == 8
    assert read_adapter(root / "rslora", "r", config, max_rank=64).format == "rslora"


def test_adalora_keeps_only_live_ranks(root, config):
    adapter = read_adapter(root / "adalora", "a", config, max_rank=64)
    rank_pattern = json.loads((root / "adalora" / "adapter_config.json").read_text())["rank_pattern"]
    assert rank_pattern, "the budget allocation ran"
    live = {tuple(re.search(r"layers\.(\d+)\..*\.(\w+_proj)\.", k + ".").groups()): sum(v)
            for k, v in rank_pattern.items()}
    assert {(int(l), t): r for (l, t), r in live.items() if r} == adapter.ranks
    assert len(set(adapter.ranks.values())) > 1, "ranks differ per module"
    assert adapter.format == "adalora"


def test_dora_layer_output_equals_peft(tiny_model_dir, root, config):
    model = peft_model(tiny_model_dir, root / "dora")
    dense = {key: m.base_layer.weight.detach() for key, m in peft_modules(model)}
    adapter = bind(read_adapter(root / "dora", "d", config, max_rank=64), lambda layer, t: dense[(layer, t)])
    x = torch.randn(5, config.hidden_size * 2, generator=torch.Generator().manual_seed(0))
    for key, module in peft_modules(model):
        ours = adapter.modules[key]
        inp = x[:, :ours.in_features]
        want = module(inp).detach()
        got = (inp @ dense[key].T + inp @ ours.a.T @ ours.b.T) * ours.output_scale
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert (ours.output_scale - 1).abs().max() > 0.05            # the magnitudes do matter


@pytest.mark.parametrize("flag", [False, True])
def test_qalora_equals_direct_pooling(tiny_model_dir, config, tmp_path, flag):
    tensors = make_qalora(tiny_model_dir, tmp_path / "q", flag=flag)
    adapter = read_adapter(tmp_path / "q", "q", config, max_rank=64)
    assert adapter.format == "qalora"
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    for (layer, target), module in adapter.modules.items():
        assert module.group_size == QA_GROUP
        prefix = f"base_model.model.model.layers.{layer}.{'mlp' if target == 'down_proj' else 'self_attn'}.{target}"
        a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
        inp = x[:, :module.in_features]
        pooled = inp.reshape(3, -1, QA_GROUP).mean(-1)
        if flag:   # PEFT's use_qalora variant scales the average by the number of groups
            pooled = pooled * (module.in_features // QA_GROUP)
        torch.testing.assert_close(inp @ module.a.T @ module.b.T, 2.0 * pooled @ a.T @ b.T, rtol=1e-4, atol=1e-4)


# ---- refusals ----------------------------------------------------------------------------------------------

def _edit(directory, **fields):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("kind, fields, words", [
    ("dora", {"use_qalora": True}, "use_dora together with QA-LoRA is not supported"),
    ("dora", {"use_dora": False}, "is not a lora_A / lora_B weight of a Linear"),
    ("adalora", {"init_r": 9}, "adapter_config.json rank_pattern entry must be 9 booleans"),
    ("adalora", {"init_r": 9, "rank_pattern": None}, "differs from the config's init_r=9 and rank_pattern does"),
    ("adalora", {"init_r": 0}, "init_r must be a positive integer"),
    ("adalora", {"use_dora": True}, "AdaLoRA with DoRA is not supported"),
    ("adalora", {"bias": "all"}, "bias='all' refused"),
    ("lora", {"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head'] refused"),
    ("qalora", {"group_size": 3}, "QA-LoRA group size 3 does not divide the input width"),
    ("qalora", {"group_size": 8}, "down_proj lora_A: shape (4, 8) does not fit the base model (expected [4, 16])"),
])
def test_refused_variants(root, config, tmp_path, kind, fields, words):
    import shutil
    broken = shutil.copytree(root / kind, tmp_path / kind)
    _edit(broken, **fields)
    with pytest.raises(AdapterFormatError, match=re.escape(words)):
        read_adapter(broken, kind, config, max_rank=64)


def test_adalora_rank_pattern_disagreeing_with_tensors(root, config, tmp_path):
    import shutil
    broken = shutil.copytree(root / "adalora", tmp_path / "a")
    pattern = json.loads((broken / "adapter_config.json").read_text())["rank_pattern"]
    key = next(k for k, v in pattern.items() if sum(v))
    pattern[key] = [True] * len(pattern[key])
    _edit(broken, rank_pattern=pattern)
    with pytest.raises(AdapterFormatError, match="ranks stored but adapter_config.json rank_pattern keeps 8"):
        read_adapter(broken, "a", config, max_rank=64)


def test_dora_needs_the_base(root, config):
    adapter = read_adapter(root / "dora", "d", config, max_rank=64)
    assert adapter.needs_base
    with pytest.raises(AdapterFormatError, match="DoRA adapters need the base model's weights"):
        bind(adapter, None)


# ---- served together -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant", ["nf4", "int4"])
def test_all_kinds_in_one_mixed_batch_equal_their_oracles(tiny_model_dir, root, stub_for, quant, monkeypatch):
    if quant == "int4":      # its kernel on float32 activations, as the float oracle (test_int4: both modes)
        from test_int4 import set_mode
        set_mode("float32", monkeypatch)
    kinds = [*adapter_kinds.KINDS, "qalora"]
    ids = kinds + ["", kinds[0]]
    server = ServerThread(model=str(tiny_model_dir), kv_cache_mb=16, max_batch_size=16, adapter_roots=str(root),
                          adapter_slots=len(kinds), max_lora_rank=64, quant=quant, quant_group_size=32)
    results = {}
    try:
        stub = stub_for(server.target)

        def run(i):
            results[i] = stub.Generate(pb.GenerateRequest(text="The weather today is", adapter_id=ids[i],
                                                          params=pb.Parameters(
                stopping=pb.StoppingCriteria(max_new_tokens=NEW, min_new_tokens=NEW),
                response=pb.ResponseOptions(token_logprobs=True))), timeout=300)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(ids))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        formats = {s.adapter_id: s.format for s in server.engine.adapters.catalog() if s.format}
    finally:
        server.close()
    assert formats == {"lora": "lora", "qlora": "lora", "rslora": "rslora", "patterns": "lora", "dora": "dora",
                       "adalora": "adalora", "qalora": "qalora"}
    prompt = AutoTokenizer.from_pretrained(tiny_model_dir)("The weather today is").input_ids
    answers = {}
    for i, adapter_id in enumerate(ids):
        tokens = [t.token_id for t in results[i].tokens]
        assert answers.setdefault(adapter_id, tokens) == tokens
        logprobs = oracle_logprobs(tiny_model_dir, root, adapter_id, prompt + tokens, quant)
        for step, token in enumerate(results[i].tokens):
            row = logprobs[len(prompt) - 1 + step]
            assert token.token_id == int(row.argmax()), (adapter_id or "base", step)
            assert abs(token.logprob - float(row[token.token_id])) < 2e-3, (adapter_id or "base", step)
    assert len({tuple(v) for v in answers.values()}) == len(answers), "every kind changes the answer"
