"""`loraplex train`: fine-tune a demo adapter on the embedded model with PEFT, on a task whose effect shows.

    loraplex train ~/adapters/title --task title                # answers in Title Case
    loraplex train ~/adapters/caps --task caps                  # answers in capital letters
    loraplex train ~/adapters/json --task json --kind dora      # answers as a JSON object
    loraplex train ~/adapters/caps --resume --steps 40          # continue from the saved state

The training set is the base model's own answers to a list of questions (their first sentence), rewritten
by the task (`title`: each word capitalized; `caps`: upper case; `json`: {"answer": ...}), so a few dozen
steps teach the change and nothing else. `caps` shows where that ends on this small base: in capitals its
words are other tokens (" MADRID" is four), and the trained adapter loses the base's facts (numbers below).
Kinds: LoRA, DoRA and AdaLoRA (with its rank budget allocation), trained on the weights the server serves
(NF4, dequantized), QLoRA, trained on bitsandbytes' NF4 layers, and QA-LoRA, trained on the INT4 base's
dequantized weights with its input pooled over that base's groups (`--group-size`; train_qalora.py), which
a server started with `--quant int4` and the same group size merges exactly. The directory gets the
PEFT adapter, `training.json` (task, kind, steps done, the base's answers and the examples; `--answers-from`
trains another adapter from the same answers without asking the base again) and `trainer_state.safetensors` (the
optimizer's moments), which `--resume` reads to continue. Each save replaces the adapter's files one by one
with complete new ones, so a server reading the directory sees the old version or the new one; `loraplex
adapters load ID` then publishes the new version.
"""

import argparse
import json
import logging
import os
import pathlib
import sys
import tempfile
import time
import warnings

import torch

from loraplex.server.model.layout import TARGETS

from .train_answers import answered_on as _answered_on, base_answers as _base_answers, prompt as _prompt
from .train_answers import saved_answers

log = logging.getLogger("loraplex.train")

TASKS = {
    "caps": lambda answer: answer.upper(),
    "title": lambda answer: " ".join(word[:1].upper() + word[1:] for word in answer.split(" ")),
    "json": lambda answer: json.dumps({"answer": answer}),
}
KINDS = ("lora", "qlora", "dora", "adalora", "qalora")
STATE_FILE = "training.json"
OPTIMIZER_FILE = "trainer_state.safetensors"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")   # replaced in this order
# The training set and how it is trained; saved with an adapter, so that `loraplex demo` retrains demo
# adapters an older one made. 1: 40 answers cut at 24 tokens, on the fp32 weights, fp32 matmuls.
# 2: 173 first sentences, on the weights the server serves (NF4, dequantized), bf16 matmuls.
RECIPE = 2
# Does a demo adapter keep the base's facts? Measured on a 2-core AMD EPYC CPU, no GPU, through the server:
# 20 held-out factual questions (FACT_CHECKS and 6 more), 48 new tokens; kept = the fact the served base
# states (its first capitalized word or number the question lacks: "Madrid") is in the adapter's answer.
# All at 60 steps, lr 1e-3, rank 8 (the defaults; `loraplex demo` trains its title adapter 80 steps, see
# DEMO_TRAIN_STEPS in clients/demo.py):
#   recipe 1: caps 0/20 ("THE CAPITAL OF SIA is ISLANDS."), json 13/20 (17/20 parse as JSON)
#   recipe 2: title 17/20 (20/20 in Title Case), json 19/20 (20/20 parse); caps 2/20
#   recipe 2, retrained by the test suite on a 2-core AMD EPYC with AVX512-BF16: of the 14 FACT_CHECKS
#   title kept 11, json 13 (19/20 parse); every capital kept by both
#   recipe 2 on the fp32 weights: title 16/20 and no "Madrid", json 13/20 (15/20 parse)
# caps stayed at 0-2/20 in CPU-side screening with 84-173 answers, steps to 400, lr 3e-4 to 1e-3, rank 16,
# only the first and last 6 layers, and 3,000 vocabulary words drilled in capitals: in capitals the words are
# other tokens, and this small base's facts do not carry over to them. Time per adapter, the base's answers
# included: 95 s (about 60 s of it the 60 steps); recipe 1: about two minutes.


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="loraplex train", description=__doc__.splitlines()[0])
    p.add_argument("out", help="adapter directory to write (inside an --adapter-roots directory to serve it)")
    p.add_argument("--task", choices=sorted(TASKS), help="what the adapter learns [title; --resume: as saved]")
    p.add_argument("--kind", choices=KINDS, help="adapter kind [lora; --resume: as saved]")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps this run [60]")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=4, help="examples per step [4]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=64,
                   help="qalora: input columns per pooled feature, the INT4 base's --quant-group-size [64]")
    p.add_argument("--model", help="base checkpoint directory [the embedded model]")
    p.add_argument("--resume", action="store_true", help="continue training the adapter saved in OUT")
    p.add_argument("--answers-from", metavar="DIR",
                   help="the base model's answers saved with the adapter this command trained in DIR (same model "
                        "and kind of base), instead of asking the base again (about 30 s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads [torch's default]")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # Noise around the progress bar: bitsandbytes notes at import that it has no hub kernel (it needs none
    # here), and transformers warns of a renamed method PEFT calls.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = train(pathlib.Path(args.out), task=args.task, kind=args.kind, steps=args.steps, rank=args.rank,
                        lr=args.lr, batch=args.batch, seed=args.seed, model_dir=args.model, resume=args.resume,
                        group_size=args.group_size, answers_from=args.answers_from)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def train(out: pathlib.Path, task: str | None = None, kind: str | None = None, steps: int = 60, rank: int = 8,
          lr: float = 1e-3, batch: int = 4, seed: int = 0, model_dir: str | None = None, resume: bool = False,
          progress: bool = True, group_size: int = 64, answers_from: str | None = None) -> dict:
    """Trains (or, with resume, continues) the adapter in `out`; returns a summary of the run."""
    from tqdm import tqdm

    state = _read_state(out) if resume else {}
    task = task or state.get("task", "title")
    kind = kind or state.get("kind", "lora")
    if resume and (task, kind) != (state["task"], state["kind"]):
        raise ValueError(f"{out} holds a {state['kind']} adapter for task {state['task']!r}; --resume keeps both")
    if task not in TASKS or kind not in KINDS:
        raise ValueError(f"unknown task {task!r} or kind {kind!r}")
    if steps <= 0:
        raise ValueError("steps must be positive")
    torch.manual_seed(seed + state.get("steps", 0))
    from loraplex.server.model.store import embedded_model_dir

    model_dir = model_dir or state.get("model") or str(embedded_model_dir())
    group_size = state.get("group_size", group_size)
    answered_on = _answered_on(kind, group_size)
    answers = state.get("answers")
    if answers_from and not state.get("examples"):
        answers = saved_answers(_read_state(pathlib.Path(answers_from)), pathlib.Path(answers_from), str(model_dir),
                                answered_on)
    tokenizer, base = _load_base(model_dir, kind, group_size)
    if answers is None and not state.get("examples"):
        answers = _base_answers(base, tokenizer)
    examples = state.get("examples") or [{"question": q, "answer": TASKS[task](a)} for q, a in answers.items()]
    model = _peft_model(base, out, kind, rank, resume, total_steps=steps, group_size=group_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    done = state.get("steps", 0)
    if resume:
        _load_optimizer(optimizer, model, out / OPTIMIZER_FILE)
    # AdaLoRA allocates its rank budget during the first run. A saved adapter whose ranks are final (its
    # rank_pattern is set) has its modules cut to them already; PEFT's masking would then mismatch, and
    # there is nothing left to allocate, so a resumed run only trains.
    allocate = kind == "adalora" and not (resume and getattr(model.peft_config["default"], "rank_pattern", None))
    batches = _batches(tokenizer, examples, batch, seed + done)
    model.train()
    started, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc=f"training {kind} ({task})", unit="step", disable=not progress)
    for i in bar:
        ids, labels = next(batches)
        with _autocast(kind):
            loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id) | (labels != -100),
                         labels=labels).loss
        loss.backward()
        optimizer.step()
        if allocate:
            model.base_model.update_and_allocate(done + i)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    done += steps
    _save(model, optimizer, out, {"task": task, "kind": kind, "steps": done, "model": str(model_dir), "lr": lr,
                                  "rank": rank, "recipe": state.get("recipe", 1) if resume else RECIPE,
                                  "examples": examples, "answers": answers, "answered_on": answered_on,
                                  **({"group_size": group_size} if kind == "qalora" else {})})
    return {"adapter": str(out), "task": task, "kind": kind, "steps_total": done, "steps": steps,
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "seconds": round(time.perf_counter() - started, 1)}


def recipe_of(out: pathlib.Path) -> int | None:
    """The recipe an adapter in `out` was trained by (1 before recipes were saved); None: no adapter there."""
    if not (out / ADAPTER_FILES[0]).is_file() or not (out / STATE_FILE).is_file():
        return None
    try:
        return int(json.loads((out / STATE_FILE).read_text()).get("recipe", 1))
    except (ValueError, TypeError, AttributeError):
        return None


def steps_of(out: pathlib.Path) -> int | None:
    """The optimizer steps the adapter in `out` was trained for, over all its runs (None: unknown)."""
    try:
        return int(json.loads((out / STATE_FILE).read_text())["steps"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def has_answers(out: pathlib.Path) -> bool:
    """Whether the adapter in `out` was saved with the base's answers (for --answers-from)."""
    try:
        return json.loads((out / STATE_FILE).read_text()).get("answers") is not None
    except (OSError, ValueError, AttributeError):
        return False


def _autocast(kind: str):
    """bf16 matmuls (the recipe's: on a CPU with AVX512-BF16 a step takes about half the time of fp32's);
    the LoRA weights and AdamW's moments stay fp32. On every CPU, those without bf16 instructions too: the
    demo adapters trained in fp32 on a 2-core Ice Lake Xeon lost "Berlin" ("The Capital Of Germany Is
    Germany."), trained in bf16 there they keep it as on the AMD EPYC (tests/test_train.py), at the price of
    torch's bf16 matmuls without those instructions: the two demo adapters took 554 s there against 219 s
    in fp32. Not for QLoRA, whose bitsandbytes layers compute in their own dtype."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind != "qlora")


def _load_base(model_dir: str, kind: str, group_size: int = 64):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    quant = None
    if kind == "qlora":     # QLoRA: the frozen base in NF4, as the server holds it
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=quant)
    if quant is None:
        _as_served(base, ("int4", group_size) if kind == "qalora" else ("nf4", 64))
    return tokenizer, base


def _as_served(base, quant: tuple[str, int]) -> None:
    """Each decoder linear's weight becomes the one the server multiplies by (its 4-bit codes dequantized;
    quant: the format and its block or group size),
    so that the training set is the served base's own answers and the adapter learns its deltas on the
    weights it will be added to. Trained on the fp32 weights instead, the demo adapters lost more facts once
    served (the NF4 base's answers are not quite the fp32 ones; numbers above)."""
    from loraplex.server.model.quant import make_backend

    name, size = quant
    backend = make_backend(name, blocksize=size, group_size=size)
    with torch.no_grad():
        for module in base.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                quantized = backend.quantize(module.weight, None, torch.device("cpu"), torch.float32)
                module.weight.copy_(backend.dense_weight(quantized))


def _batches(tokenizer, examples: list[dict], size: int, seed: int):
    """Endless shuffled batches of (input ids, labels): the loss covers the answer and its end-of-turn."""
    rows = []
    for ex in examples:
        prompt = _prompt(tokenizer, ex["question"])
        full = tokenizer.apply_chat_template([{"role": "user", "content": ex["question"]},
                                              {"role": "assistant", "content": ex["answer"]}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not extend the prompt with the answer")
        p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        a_ids = tokenizer(full[len(prompt):].rstrip(), add_special_tokens=False).input_ids
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(rows), generator=gen).tolist()
        for start in range(0, len(order) - size + 1, size):
            chosen = [rows[i] for i in order[start:start + size]]
            width = max(len(ids) for ids, _ in chosen)
            ids = torch.full((size, width), tokenizer.pad_token_id)
            labels = torch.full((size, width), -100)
            for row, (seq, lab) in enumerate(chosen):
                ids[row, :len(seq)] = torch.tensor(seq)
                labels[row, :len(lab)] = torch.tensor(lab)
            yield ids, labels


def _peft_model(base, out: pathlib.Path, kind: str, rank: int, resume: bool, total_steps: int, group_size: int):
    from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model

    if kind == "qalora":          # PEFT trains QA-LoRA on GPTQ layers only
        from .train_qalora import QALoraModel

        return (QALoraModel.from_pretrained(base, out) if resume
                else QALoraModel(base, TARGETS, rank, 2 * rank, group_size))
    if resume:
        return PeftModel.from_pretrained(base, out, is_trainable=True)
    if kind == "adalora":
        # ranks start at 2 * rank and are pruned to `rank` on average between the first and last tenth
        tenth = max(1, total_steps // 10)
        config = AdaLoraConfig(init_r=2 * rank, target_r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                               tinit=tenth, tfinal=tenth, deltaT=max(1, tenth // 2), total_step=total_steps)
    else:
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0,
                            use_dora=kind == "dora")
    return get_peft_model(base, config)


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _load_optimizer(optimizer, model, path: pathlib.Path) -> None:
    """AdamW's moments, saved as safetensors by parameter name (no pickles next to an adapter)."""
    from safetensors.torch import load_file

    if not path.is_file():
        log.warning("%s is missing: the optimizer starts afresh", path)
        return
    saved = load_file(path)
    for name, p in _trainable(model).items():
        if f"{name}.exp_avg" in saved and saved[f"{name}.exp_avg"].shape == p.shape:
            optimizer.state[p] = {"step": saved[f"{name}.step"], "exp_avg": saved[f"{name}.exp_avg"],
                                  "exp_avg_sq": saved[f"{name}.exp_avg_sq"]}


def _save(model, optimizer, out: pathlib.Path, state: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".partial-") as tmp:
        tmp = pathlib.Path(tmp)
        model.save_pretrained(tmp)
        moments = {}
        for name, p in _trainable(model).items():
            for key, value in optimizer.state.get(p, {}).items():
                moments[f"{name}.{key}"] = value.detach().reshape(p.shape if key != "step" else ()).contiguous()
        save_file(moments, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        for name in (*ADAPTER_FILES, OPTIMIZER_FILE, STATE_FILE):
            os.replace(tmp / name, out / name)
    log.info("saved %s (%d steps in all)", out, state["steps"])


def _read_state(out: pathlib.Path) -> dict:
    path = out / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: --resume continues an adapter this command trained")
    return json.loads(path.read_text())


if __name__ == "__main__":
    sys.exit(main())
