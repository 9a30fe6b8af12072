"""The training set of `loraplex train`: the base model's own greedy answers to QUESTIONS (their first
sentence), asked once and saved with an adapter, so that another adapter on the same base can be trained
from them (`--answers-from`)."""

import logging
import pathlib
import re

import torch

from .train_questions import QUESTIONS

log = logging.getLogger("loraplex.train")


def base_answers(model, tokenizer, max_new_tokens: int = 32) -> dict[str, str]:
    """The base model's own greedy answers to QUESTIONS, cut to their first sentence."""
    log.info("asking the base model %d questions for the training set", len(QUESTIONS))
    prompts = [prompt(tokenizer, q) for q in QUESTIONS]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id)
    new = out[:, enc.input_ids.shape[1]:]               # [questions, up to max_new_tokens]
    answers = tokenizer.batch_decode(new, skip_special_tokens=True)
    ended = ((new == tokenizer.eos_token_id) | (new == tokenizer.pad_token_id)).any(dim=1).tolist()
    return {q: first_sentence(a, e) for q, a, e in zip(QUESTIONS, answers, ended)}


def answered_on(kind: str, group_size: int) -> str:
    """The base the training set's answers come from: the weights a kind is trained on (see _load_base)."""
    return {"qlora": "nf4 (bitsandbytes layers)", "qalora": f"int4 g{group_size} (dequantized)"}.get(
        kind, "nf4 (dequantized)")


def saved_answers(state: dict, source: pathlib.Path, model_dir: str, answered_on: str) -> dict[str, str]:
    """The base's answers another training run saved (`state`, read from `source`), if it asked the same base."""
    if state.get("answers") is None:
        raise ValueError(f"{source} has no saved answers of the base model (an older run trained it)")
    if (state.get("model"), state.get("answered_on")) != (model_dir, answered_on):
        raise ValueError(f"{source}'s answers come from {state.get('model')} ({state.get('answered_on')}), "
                         f"this run trains on {model_dir} ({answered_on})")
    if list(state["answers"]) != QUESTIONS:
        raise ValueError(f"{source}'s answers are to other questions than this version's")
    return state["answers"]


def first_sentence(text: str, ended: bool) -> str:
    """Up to the first sentence end; without one, the whole answer if it ended, else up to its last whole
    word. Answers cut mid-word taught the adapters to stop mid-word and the json one to run on unclosed."""
    text = text.strip()
    end = re.search(r"[.!?](\s|$)", text)
    if end:
        return text[:end.start() + 1]
    return text if ended or " " not in text else text.rsplit(" ", 1)[0]


def prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
