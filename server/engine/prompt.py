"""Prompt text or chat messages -> token ids, with the model's tokenizer and chat template."""

from ..errors import InvalidArgumentError

ROLES = ("system", "user", "assistant", "tool")


def encode_prompt(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    for i, message in enumerate(prompt):
        if message.get("role") not in ROLES:
            raise InvalidArgumentError(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, "
                                                              f"got {message.get('role')!r}")
    if not tokenizer.chat_template:
        raise InvalidArgumentError("prompt", "this model has no chat template; send text instead")
    text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def truncate(ids: list[int], keep_last: int) -> list[int]:
    """Keeps the last keep_last tokens (0 = keep all)."""
    return ids[-keep_last:] if 0 < keep_last < len(ids) else ids
