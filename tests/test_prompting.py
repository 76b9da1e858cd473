"""farense.prompting.chat_prompt: the one prompt of a question, for the validate stage and for serving alike."""

from __future__ import annotations

from typing import Any

from farense import evaluate, inference, prompting
from farense.inference import InferenceModel
from farense.prompting import chat_prompt, template_ids


class TemplateTokenizer:
    """Characters as token ids; a ChatML-like template, as the tiny test models and SmolLM2 have."""

    has_chat_template = True

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool,
                            return_dict: bool) -> list[int]:  # fmt: skip
        assert add_generation_prompt and not return_dict
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages) + "<assistant>"
        return [ord(c) for c in text]

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class PlainTokenizer(TemplateTokenizer):
    has_chat_template = False


def text(ids: list[int]) -> str:
    return "".join(map(chr, ids))


def test_the_question_in_the_template_with_the_system_prompt_first() -> None:
    tok = TemplateTokenizer()
    assert text(chat_prompt(tok, "Onde?", "Sê breve.")) == "<system>Sê breve.</><user>Onde?</><assistant>"
    assert text(chat_prompt(tok, "Onde?", None)) == "<user>Onde?</><assistant>"
    assert text(chat_prompt(tok, "Onde?", "")) == "<user>Onde?</><assistant>"


def test_without_a_template_the_system_prompt_and_question_as_plain_text() -> None:
    tok = PlainTokenizer()
    assert text(chat_prompt(tok, "Onde?", "Sê breve.")) == "Sê breve.\n\nOnde?\n"
    assert text(chat_prompt(tok, "Onde?", None)) == "Onde?\n"


def test_validation_and_serving_build_the_same_prompt() -> None:
    assert evaluate.chat_prompt is inference.chat_prompt is prompting.chat_prompt
    tok: Any = TemplateTokenizer()
    served = InferenceModel(model=None, tokenizer=tok, system_prompt="Sê breve.", context_length=2048)  # type: ignore
    assert served.prompt_ids("Onde?") == chat_prompt(tok, "Onde?", "Sê breve.")
    conversation = [{"role": "user", "content": "Onde?"}]
    system = {"role": "system", "content": "Sê breve."}
    assert served.prompt_ids(conversation) == template_ids(tok, [system, *conversation])
