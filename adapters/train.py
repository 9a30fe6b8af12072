"""`loraplex train`: fine-tune a demo adapter on the embedded model with PEFT, on a task whose effect shows.

    loraplex train ~/adapters/caps --task caps                  # answers in capital letters
    loraplex train ~/adapters/json --task json --kind dora      # answers as a JSON object
    loraplex train ~/adapters/caps --resume --steps 40          # continue from the saved state

The training set is the base model's own answers to a list of questions, rewritten by the task (`caps`:
upper case; `json`: {"answer": ...}), so a few dozen steps teach the change and nothing else. Kinds: LoRA,
QLoRA (trained on the NF4 base), DoRA and AdaLoRA (with its rank budget allocation). The directory gets the
PEFT adapter, `training.json` (task, kind, steps done, the examples) and `trainer_state.safetensors` (the
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

log = logging.getLogger("loraplex.train")

QUESTIONS = [
    "What is the capital of France?", "Name a fruit that is yellow.", "How many legs does a spider have?",
    "What color is the sky on a clear day?", "Name a large animal that lives in the sea.",
    "What do bees make?", "What is the opposite of hot?", "Name a planet in our solar system.",
    "What do you use to write on paper?", "What is frozen water called?", "Name a musical instrument.",
    "What season comes after winter?", "What is the largest ocean?", "Name a vegetable that is orange.",
    "What do plants need to grow?", "How many days are in a week?", "What is the capital of Japan?",
    "Name a bird that cannot fly.", "What do cows drink?", "What gas do people breathe in?",
    "What is the tallest animal?", "Name something you wear on your feet.", "What do you call a baby cat?",
    "What is two plus three?", "Name a shape with three sides.", "Where does the sun rise?",
    "What is the color of grass?", "Name a sport played with a ball.", "What do fish live in?",
    "What is the main ingredient of bread?", "Name a tool used to cut paper.", "What is the capital of Italy?",
    "Why do we need sleep?", "What is the fastest land animal?", "Name a country in South America.",
    "What do you call the meal in the morning?", "How many hours are in a day?", "What is rain made of?",
    "Name a metal.", "What does a thermometer measure?",
]
# Never trained on: the checks of a trained adapter ask these.
HELD_OUT = [
    "What is the capital of Spain?", "Name a fruit that is red.", "What do birds use to fly?",
    "What is the color of snow?", "Name a farm animal.", "What do you drink when you are thirsty?",
]
TASKS = {
    "caps": lambda answer: answer.upper(),
    "json": lambda answer: json.dumps({"answer": answer}),
}
KINDS = ("lora", "qlora", "dora", "adalora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STATE_FILE = "training.json"
OPTIMIZER_FILE = "trainer_state.safetensors"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")   # replaced in this order


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="loraplex train", description=__doc__.splitlines()[0])
    p.add_argument("out", help="adapter directory to write (inside an --adapter-roots directory to serve it)")
    p.add_argument("--task", choices=sorted(TASKS), help="what the adapter learns [caps; --resume: as saved]")
    p.add_argument("--kind", choices=KINDS, help="adapter kind [lora; --resume: as saved]")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps this run [60]")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=4, help="examples per step [4]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="base checkpoint directory [the embedded model]")
    p.add_argument("--resume", action="store_true", help="continue training the adapter saved in OUT")
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
                        lr=args.lr, batch=args.batch, seed=args.seed, model_dir=args.model, resume=args.resume)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def train(out: pathlib.Path, task: str | None = None, kind: str | None = None, steps: int = 60, rank: int = 8,
          lr: float = 1e-3, batch: int = 4, seed: int = 0, model_dir: str | None = None, resume: bool = False,
          progress: bool = True) -> dict:
    """Trains (or, with resume, continues) the adapter in `out`; returns a summary of the run."""
    from tqdm import tqdm

    state = _read_state(out) if resume else {}
    task = task or state.get("task", "caps")
    kind = kind or state.get("kind", "lora")
    if resume and (task, kind) != (state["task"], state["kind"]):
        raise ValueError(f"{out} holds a {state['kind']} adapter for task {state['task']!r}; --resume keeps both")
    if task not in TASKS or kind not in KINDS:
        raise ValueError(f"unknown task {task!r} or kind {kind!r}")
    if steps <= 0:
        raise ValueError("steps must be positive")
    torch.manual_seed(seed + state.get("steps", 0))
    model_dir = model_dir or state.get("model") or _embedded_model_dir()
    tokenizer, base = _load_base(model_dir, kind)
    examples = state.get("examples") or _examples(base, tokenizer, task)
    model = _peft_model(base, out, kind, rank, resume, total_steps=steps)
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
                                  "rank": rank, "examples": examples})
    return {"adapter": str(out), "task": task, "kind": kind, "steps_total": done, "steps": steps,
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "seconds": round(time.perf_counter() - started, 1)}


def _embedded_model_dir() -> str:
    from loraplex.server.config import ServerConfig
    from loraplex.server.model.store import default_model_dir

    return str(default_model_dir(pathlib.Path(ServerConfig().resolved_cache_dir())))


def _load_base(model_dir: str, kind: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    quant = None
    if kind == "qlora":     # QLoRA: the frozen base in NF4, as the server holds it
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=quant)
    return tokenizer, base


def _examples(model, tokenizer, task: str, max_new_tokens: int = 24) -> list[dict]:
    """The base model's own greedy answers, rewritten by the task."""
    log.info("asking the base model %d questions for the training set", len(QUESTIONS))
    prompts = [_prompt(tokenizer, q) for q in QUESTIONS]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return [{"question": q, "answer": TASKS[task](a.strip())} for q, a in zip(QUESTIONS, answers)]


def _prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


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


def _peft_model(base, out: pathlib.Path, kind: str, rank: int, resume: bool, total_steps: int):
    from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model

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
