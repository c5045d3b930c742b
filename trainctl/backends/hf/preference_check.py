"""The data check for preference rows (DPO): every row checked before the model loads, each
problem one line naming the config key, the line of the file and the fix.

The forms are TRL's: ``{"prompt", "chosen", "rejected"}`` with strings or message lists, and
implicit prompts (``chosen``/``rejected`` alone: their shared leading turns, or for strings their
shared leading text, are the prompt, split off with TRL's own ``extract_prompt``). One form per file: TRL builds an
Arrow table from the rows, and a column cannot hold strings on one row and lists on another.

Rules: a row that is not a JSON object, ``chosen``/``rejected`` missing or empty, ``chosen`` equal
to ``rejected`` (no preference to learn), mixed strings and message lists (in a row or against
the file's first row), conversations that break the role order, implicit prompts that share no
leading turn, and prompts too long to leave room for an answer. Prompts are counted as TRL's
DPOTrainer tokenizes them: the chat template with the generation prompt for conversations, the
plain tokenizer for strings. TRL silently drops a row whose prompt fills ``max_length``; here it
is an error (``hf.dpo.too_long = "error"``), so a data set never shrinks without a word, unless
``too_long = "drop"`` asks for TRL's behaviour: then TRL drops them and the plan counts them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from trainctl.backends.hf.rows import Rows
from trainctl.backends.hf.validate import ROLES, _follows
from trainctl.kernel.errors import ConfigError

ANSWERS = ("chosen", "rejected")


def check_preference_rows(rows: Rows, *, source: str, tokenizer: Any, max_length: int,
                          too_long: str = "error") -> list[str]:
    """One line per problem in ``rows`` (``source``: the config key, e.g. ``data.train``); empty
    when every row can train. ``too_long = "drop"``: a prompt that fills ``max_length`` is no
    problem (TRL's preparation drops the pair)."""
    found = [(line, f"{why}; every line must be one JSON object") for line, why in rows.bad]
    if not rows.rows and not rows.bad:
        return [f"{source}: {rows.source} has no rows; give at least one preference pair"]
    form = _form(rows.rows[0]) if rows.rows else None
    if form == "messages" and not getattr(tokenizer, "chat_template", None):
        return [f"{source} line {line}: {why}" for line, why in sorted(found)] + [
            f"{source}: the rows are conversations and the tokenizer has no chat template; set "
            "model.chat_template, or give prompt/chosen/rejected as strings"]
    with _quiet_tokenizer():
        for line, row in zip(rows.lines, rows.rows):
            problem = next(_row_problems(row, form, tokenizer, max_length if too_long == "error" else None), None)
            if problem:
                found.append((line, problem))
    return [f"{source} line {line}: {why}" for line, why in sorted(found)]


def require_valid_preferences(rows: Rows, *, source: str, tokenizer: Any, max_length: int,
                              too_long: str = "error", show: int = 5) -> None:
    """Raise ConfigError (exit 2) naming the file, the count and the first ``show`` problems."""
    problems = check_preference_rows(rows, source=source, tokenizer=tokenizer, max_length=max_length, too_long=too_long)
    if problems:
        more = f" (and {len(problems) - show} more)" if len(problems) > show else ""
        raise ConfigError(f"data check failed: {len(problems)} problem(s) in {rows.source}: "
                          + " | ".join(problems[:show]) + more)


@contextlib.contextmanager
def _quiet_tokenizer() -> Iterator[None]:
    """Counting a prompt longer than the tokenizer's model_max_length is the point here, not an
    accident: transformers' warning about it would be a second, confusing line on stderr."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _form(row: dict[str, Any]) -> str:
    """``strings`` or ``messages``, from the answers (the prompt may be absent)."""
    return "messages" if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list) else "strings"


def _row_problems(row: dict[str, Any], form: str | None, tokenizer: Any, max_length: int | None) -> Iterator[str]:
    """The first problem of a row is enough: later rules assume the earlier ones passed.
    ``max_length`` None: the prompt's length is not checked."""
    for key in ANSWERS:
        if row.get(key) is None:
            yield f"'{key}' is missing; a preference row needs both 'chosen' and 'rejected'"
            return
    kinds = {key: _kind(row[key]) for key in ("prompt", *ANSWERS) if key in row and row[key] is not None}
    if "other" in kinds.values():
        bad = next(k for k, v in kinds.items() if v == "other")
        yield f"'{bad}' is a {type(row[bad]).__name__}; give a string or a list of {{role, content}} messages"
        return
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"'{k}' is {'a message list' if v == 'messages' else 'a string'}" for k, v in kinds.items())
        yield f"wrong types: {listed}; give all of them as strings or all as message lists"
        return
    if form is not None and _form(row) != form:
        first, these = ("message lists", "strings") if form == "messages" else ("strings", "message lists")
        yield f"the answers are {these} but the file's first row uses {first}; use one form per file"
        return
    if form == "messages":
        yield from _conversation_problems(row, tokenizer, max_length)
    else:
        yield from _string_problems(row, tokenizer, max_length)


def _kind(value: Any) -> str:
    return "strings" if isinstance(value, str) else "messages" if isinstance(value, list) else "other"


def _string_problems(row, tokenizer, max_length: int | None) -> Iterator[str]:
    from trl.data_utils import extract_prompt

    for key in ANSWERS:
        if not row[key].strip():
            yield f"'{key}' is empty; a preference pair needs two non-empty answers"
            return
    if row["chosen"] == row["rejected"]:
        yield "chosen and rejected are identical; a preference pair needs two different answers"
        return
    prompt = row.get("prompt")
    if prompt is None:  # implicit prompt (e.g. Anthropic HH's "Human: ... Assistant: ..." texts): the shared start
        prompt = extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})["prompt"]
        if not prompt.strip():
            yield ("chosen and rejected share no leading text, so there is no implicit prompt; start both with "
                   "the same prompt, or give an explicit 'prompt'")
            return
    if max_length is not None:
        yield from _prompt_length(len(tokenizer(prompt)["input_ids"]), max_length)


def _conversation_problems(row, tokenizer, max_length: int | None) -> Iterator[str]:
    from trl.data_utils import extract_prompt

    for key in ("prompt", *ANSWERS):
        if key in row and (problem := _messages_problem(row[key], key)):
            yield problem
            return
    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:  # implicit prompt: the leading turns both answers share, split off as TRL does
        if row["chosen"] == row["rejected"]:
            yield "chosen and rejected are identical; a preference pair needs two different answers"
            return
        split = extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
        prompt, chosen, rejected = split["prompt"], split["chosen"], split["rejected"]
        if not prompt:
            yield ("chosen and rejected share no leading turn, so there is no implicit prompt; start both with "
                   "the same user turn(s), or give an explicit 'prompt'")
            return
    if not prompt:
        yield "'prompt' is an empty list; give the user turn(s) the answers reply to"
        return
    if prompt[-1].get("role") not in ("user", "tool"):
        yield f"the prompt ends with a {prompt[-1].get('role')} turn; it must end with the user turn the answers reply to"
        return
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or any(m.get("role") != "assistant" for m in answer):
            yield f"'{key}' must continue the prompt with assistant turns only"
            return
        if not any(str(m.get("content") or "").strip() or m.get("tool_calls") for m in answer):
            yield f"'{key}' is empty; a preference pair needs two non-empty answers"
            return
    if chosen == rejected:
        yield "chosen and rejected are identical; a preference pair needs two different answers"
        return
    if max_length is not None:
        rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        yield from _prompt_length(len(tokenizer(rendered, add_special_tokens=False)["input_ids"]), max_length)


def _messages_problem(messages: list[Any], key: str) -> str | None:
    """A message list's shape and role order (the order rules are the SFT check's)."""
    if not messages:
        return f"'{key}' is empty; a preference pair needs two non-empty answers" if key in ANSWERS else None
    previous = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"{key}[{i}] must be an object with a 'role' ({', '.join(ROLES)})"
        if not isinstance(m.get("content"), str) and not m.get("tool_calls"):
            return f"{key}[{i}].content must be a string (text-only training)"
        # an explicit prompt's answers start after the prompt: their first turn follows a user turn
        start = "user" if key in ANSWERS and previous is None and m["role"] == "assistant" else previous
        if not _follows(start, m["role"]):
            return f"{key}[{i}]: roles out of order ({m['role']} after {previous or 'the start'})"
        previous = m["role"]
    return None


def _prompt_length(tokens: int, max_length: int) -> Iterator[str]:
    if tokens >= max_length:
        yield (f"the prompt is {tokens} tokens, which fills model.max_length {max_length} and leaves no room for "
               'the answers; shorten the prompt, raise model.max_length, or set hf.dpo.too_long = "drop" to leave '
               "such pairs out as TRL does")
