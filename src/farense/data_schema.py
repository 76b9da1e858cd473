"""What one training example may look like: JSON Schemas for its shape, pydantic models for its meaning.

The three formats are mlx-lm's (`mlx_lm/tuner/datasets.py`): chat `{"messages": [...]}`, completions
`{"prompt", "completion"}` and text `{"text"}`. The schemas check types and required fields; the row models check
what a schema cannot say well: blank text, and a conversation's turn order (optional system first, then user and
assistant alternating, ending with the assistant). Keys other than the format's own are ignored and dropped,
except `tools`: tool-calling rows need tool messages we do not validate, so they are rejected, not half-trained.

Export the schemas for users with `python -m farense.data_schema <folder>`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, NamedTuple

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaError
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

Format = Literal["chat", "completions", "text"]
FORMATS: tuple[Format, ...] = ("chat", "completions", "text")
ROLES: tuple[str, ...] = ("system", "user", "assistant")

_DRAFT = "https://json-schema.org/draft/2020-12/schema"
_NO_TOOLS = {"description": "Tool-calling rows are not supported"}

CHAT_SCHEMA: dict[str, Any] = {
    "$schema": _DRAFT,
    "$id": "urn:farense:data:chat",
    "title": "Chat example",
    "description": "A conversation: optional system message, then user/assistant turns ending with the assistant.",
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/message"}},
        "tools": {"not": {}, **_NO_TOOLS},
    },
    "$defs": {
        "message": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {"role": {"enum": list(ROLES)}, "content": {"type": "string"}},
        }
    },
}

COMPLETIONS_SCHEMA: dict[str, Any] = {
    "$schema": _DRAFT,
    "$id": "urn:farense:data:completions",
    "title": "Completions example",
    "description": "A prompt and its completion; trained as one user turn and one assistant turn.",
    "type": "object",
    "required": ["prompt", "completion"],
    "properties": {
        "prompt": {"type": "string"},
        "completion": {"type": "string"},
        "tools": {"not": {}, **_NO_TOOLS},
    },
}

TEXT_SCHEMA: dict[str, Any] = {
    "$schema": _DRAFT,
    "$id": "urn:farense:data:text",
    "title": "Text example",
    "description": "Plain text, trained on every token.",
    "type": "object",
    "required": ["text"],
    "properties": {"text": {"type": "string"}},
}

SCHEMAS: dict[Format, dict[str, Any]] = {"chat": CHAT_SCHEMA, "completions": COMPLETIONS_SCHEMA, "text": TEXT_SCHEMA}
_VALIDATORS = {name: Draft202012Validator(schema) for name, schema in SCHEMAS.items()}

# The keys that make a row one format or another, in mlx-lm's terms.
_FORMAT_KEYS: dict[Format, tuple[str, ...]] = {
    "chat": ("messages",),
    "completions": ("prompt", "completion"),
    "text": ("text",),
}
_EXPECTED = "expected 'messages' (chat), 'prompt' and 'completion' (completions) or 'text' (text)"


class InvalidExample(ValueError):
    """One row breaks a rule; the message names the field path and says what to do."""


class Example(NamedTuple):
    format: Format
    row: dict[str, Any]  # normalized: {"messages": [...]} for chat and completions, {"text": ...} for text


def _check_text(value: str) -> str:
    if not value.strip():
        raise ValueError("empty or whitespace only; write the text or drop the row")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        raise ValueError(f"contains an unpaired surrogate \\u{ord(bad):04x}, which is not Unicode; fix the escape")
    return value


class _Row(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ChatMessage(_Row):
    role: Literal["system", "user", "assistant"]
    content: str

    _content = field_validator("content")(_check_text)


class ChatRow(_Row):
    messages: list[ChatMessage]

    @model_validator(mode="after")
    def _turn_order(self) -> "ChatRow":
        roles = [m.role for m in self.messages]
        for i, role in enumerate(roles):
            if role == "system" and i > 0:
                raise ValueError(
                    f"messages[{i}].role: 'system' is only allowed as the first message; move it to the start"
                )
        start = 1 if roles[0] == "system" else 0
        if start == len(roles):
            raise ValueError("messages: only a system message; add a user turn and an assistant answer")
        if roles[start] != "user":
            raise ValueError(
                f"messages[{start}].role: the conversation must start with a user turn"
                f"{' after the system message' if start else ''}, got '{roles[start]}'"
            )
        for i in range(start + 1, len(roles)):
            if roles[i] == roles[i - 1]:
                raise ValueError(
                    f"messages[{i}].role: '{roles[i]}' follows another '{roles[i]}' turn; "
                    "turns must alternate user/assistant, merge the two"
                )
        if roles[-1] != "assistant":
            raise ValueError(
                f"messages[{len(roles) - 1}].role: the conversation must end with an assistant turn, "
                f"got '{roles[-1]}'; add the answer or drop the last turn"
            )
        return self

    def normalized(self) -> dict[str, Any]:
        return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}


class CompletionsRow(_Row):
    prompt: str
    completion: str

    _texts = field_validator("prompt", "completion")(_check_text)

    def normalized(self) -> dict[str, Any]:
        # mlx-lm's CompletionsDataset trains exactly this conversation.
        turns = [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.completion}]
        return {"messages": turns}


class TextRow(_Row):
    text: str

    _text = field_validator("text")(_check_text)

    def normalized(self) -> dict[str, Any]:
        return {"text": self.text}


ROW_MODELS: dict[Format, type[ChatRow] | type[CompletionsRow] | type[TextRow]] = {
    "chat": ChatRow,
    "completions": CompletionsRow,
    "text": TextRow,
}


def detect_format(obj: Any) -> Format:
    """The format a decoded JSON line claims by its keys; InvalidExample if none or several."""
    if not isinstance(obj, dict):
        raise InvalidExample(f"the line is a JSON {_json_type(obj)}, not an object; {_EXPECTED}")
    found = [name for name, keys in _FORMAT_KEYS.items() if any(k in obj for k in keys)]
    if not found:
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise InvalidExample(f"unknown format (keys: {keys}); {_EXPECTED}")
    if len(found) > 1:
        raise InvalidExample(f"keys of several formats ({' and '.join(found)}); keep one format per row")
    return found[0]


def parse_example(obj: Any) -> Example:
    """Check one decoded JSON line against its format's schema, then its row model; return it normalized."""
    fmt = detect_format(obj)
    errors = sorted(_VALIDATORS[fmt].iter_errors(obj), key=lambda e: [(isinstance(p, str), p) for p in e.path])
    if errors:
        raise InvalidExample("; ".join(_schema_reason(e) for e in errors[:3]) + _more(len(errors) - 3))
    try:
        model = ROW_MODELS[fmt].model_validate(obj)
    except ValidationError as e:
        problems = e.errors(include_url=False)
        raise InvalidExample("; ".join(_model_reason(p) for p in problems[:3]) + _more(len(problems) - 3)) from None
    return Example(fmt, model.normalized())


def field_path(parts: Iterable[str | int]) -> str:
    """('messages', 2, 'role') -> 'messages[2].role'."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<row>"


def _schema_reason(e: SchemaError) -> str:
    path = field_path(e.absolute_path)
    if e.validator == "required":
        missing = [k for k in e.validator_value if isinstance(e.instance, dict) and k not in e.instance]
        where = f"{path}." if e.absolute_path else ""
        return "; ".join(f"{where}{k}: required field missing; add it" for k in missing)
    if e.validator == "type":
        return f"{path}: expected {_a(e.validator_value)}, got {_a(_json_type(e.instance))}"
    if e.validator == "enum":
        return f"{path}: {_short(e.instance)} is not one of {'/'.join(e.validator_value)}"
    if e.validator == "minItems":
        return f"{path}: empty list; a conversation needs a user turn and an assistant answer"
    if e.validator == "not" and path == "tools":
        return "tools: tool-calling rows are not supported; remove 'tools' and the tool turns"
    return f"{path}: {e.message}"


def _model_reason(problem: dict[str, Any]) -> str:
    ctx = problem.get("ctx") or {}
    msg = str(ctx["error"]) if "error" in ctx else problem["msg"]
    if not problem["loc"]:
        return msg  # model-level rules name their own field path
    return f"{field_path(problem['loc'])}: {msg}"


def _more(n: int) -> str:
    return f"; and {n} more problem(s)" if n > 0 else ""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_schemas(folder: Path) -> list[Path]:
    """Write `<format>.schema.json` for each format, for users' editors and CI."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, schema in SCHEMAS.items():
        path = folder / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(written)
