"""Conversations in Firefly's jsonl format, rendered with a template into tokens and a target mask.

One line of a jsonl file is one conversation:

    {"conversation_id": 1, "category": "Brainstorming",
     "conversation": [{"human": "...", "assistant": "..."}, {"human": "...", "assistant": "..."}]}

Only `conversation` is read (a non-empty list of turns, each a `human` and an `assistant` text).

A template says what surrounds the turns; its keys (any left out keep the default below):

    system            text before the first turn
    human_prefix      before each human text
    human_suffix      after each human text
    assistant_prefix  after the human suffix, before the assistant's text
    assistant_suffix  after the assistant's text

A turn is two pieces, tokenized separately and concatenated, so that the boundary of the target
mask falls exactly between two tokens: the context (the system text before the first turn, then
human_prefix + human + human_suffix + assistant_prefix), mask 0, and the answer (assistant +
assistant_suffix, then the end-of-turn ids: create_tfrecords' separator, the tokenizer's end of
text by default), mask 1. A tokenizer that adds a prefix space adds it to each piece.

Sampling (`main.py --predict` with a conversation prompt) renders the same way up to the last
turn's assistant_prefix, and the model continues as the assistant.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from errors import ConfigError, DataError

DEFAULT_TEMPLATE = {
    "system": "",
    "human_prefix": "Human: ",
    "human_suffix": "\n",
    "assistant_prefix": "Assistant:",
    "assistant_suffix": "",
}
EXPECTED = ('a JSON object with "conversation": a non-empty list of {"human": text, "assistant": text} turns '
            "(Firefly's format)")


def check_template(values, where: str) -> dict[str, str]:
    """The template of `values` (a dict of DEFAULT_TEMPLATE's keys, all strings), defaults filled in."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: a conversation template is a JSON object with the keys {', '.join(DEFAULT_TEMPLATE)}")
    unknown = [key for key in values if key not in DEFAULT_TEMPLATE]
    if unknown:
        raise ConfigError(f"{where}: unknown template key {unknown[0]!r}; accepted: {', '.join(DEFAULT_TEMPLATE)}")
    for key, value in values.items():
        if not isinstance(value, str):
            raise ConfigError(f"{where}: template key {key!r} has {json.dumps(value)}; it takes a string")
    return {**DEFAULT_TEMPLATE, **values}


def load_template(path: str | None) -> dict[str, str]:
    """--conversation_template FILE (a JSON object), or DEFAULT_TEMPLATE without one."""
    if path is None:
        return dict(DEFAULT_TEMPLATE)
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--conversation_template {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--conversation_template {path}: not a JSON object ({err})") from None
    return check_template(values, f"--conversation_template {path}")


def parse_conversation(line: str, where: str, prompt: bool = False) -> list[tuple[str, str]]:
    """(human, assistant) turns of one jsonl line; `where` (file:line) names it in a DataError. In a
    prompt, the last turn's assistant is left out or empty: that is what the model writes."""
    try:
        values = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not JSON ({err.msg} at column {err.colno}); expected {EXPECTED}") from None
    turns = values.get("conversation") if isinstance(values, dict) else None
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: no \"conversation\" list; expected {EXPECTED}")
    parsed = []
    for number, turn in enumerate(turns):
        last = number == len(turns) - 1
        if last and prompt and isinstance(turn, dict):
            if turn.get("assistant", ""):
                raise DataError(f"{where}: the last turn of a prompt holds an assistant text; leave it out or "
                                "empty: the model writes it")
            turn = {**turn, "assistant": ""}
        if (not isinstance(turn, dict) or not isinstance(turn.get("human"), str)
                or not isinstance(turn.get("assistant"), str)):
            raise DataError(f"{where}: turn {number} of \"conversation\" is {json.dumps(turn)[:80]}; expected {EXPECTED}")
        parsed.append((turn["human"], turn["assistant"]))
    return parsed


def read_conversations(path: Path, skip: int = 0) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """(line index, turns) of every conversation of a jsonl file from line `skip` on; blank lines are
    passed over, a malformed one is a DataError naming the file and the line (counted from 1)."""
    with open(path, encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if index < skip or not line.strip():
                continue
            yield index, parse_conversation(line, f"{path}: line {index + 1}")


def context_text(template: dict[str, str], human: str, first: bool) -> str:
    return ((template["system"] if first else "") + template["human_prefix"] + human + template["human_suffix"]
            + template["assistant_prefix"])


def render(turns: list[tuple[str, str]], template: dict[str, str], encode, end_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, target mask) of a conversation, int32 each: 1 on each answer's tokens and its
    end-of-turn ids, 0 on the template's text and the human turns. `encode`: text -> ids."""
    ids, mask = [], []
    for number, (human, assistant) in enumerate(turns):
        context = encode(context_text(template, human, number == 0))
        answer = [*encode(assistant + template["assistant_suffix"]), *end_ids]
        ids += [*context, *answer]
        mask += [0] * len(context) + [1] * len(answer)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def render_prompt(turns: list[tuple[str, str]], template: dict[str, str], encode, end_ids: list[int]) -> list[int]:
    """The tokens a model continues as the assistant: the turns before the last rendered as
    training renders them, then the last turn's context, ending with the assistant prefix."""
    ids, _ = render(turns[:-1], template, encode, end_ids)
    return [*ids.tolist(), *encode(context_text(template, turns[-1][0], len(turns) == 1))]
