"""How a question is put to the model: the one prompt builder of validation, the benchmark and serving, so that what
the validate stage measures is what `farense ask` and `farense serve` answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def template_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template, ending where the assistant's turn starts."""
    return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_dict=False))


def chat_prompt(tokenizer: Any, question: str, system_prompt: str | None) -> list[int]:
    """Token ids of the question in the chat template, ending where the assistant's answer starts; a tokenizer
    without a template gets the system prompt, a blank line and the question as plain text."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}
    ]
    if getattr(tokenizer, "has_chat_template", False):
        return template_ids(tokenizer, messages)
    text = (f"{system_prompt}\n\n" if system_prompt else "") + question + "\n"
    return list(tokenizer.encode(text))
