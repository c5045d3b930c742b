"""Dataset validation: every row checked before the model loads, problems grouped by rule into
a report a person can act on. Errors stop the run (exit 2); warnings are listed and training
goes on.

Rules: rows that are not JSON objects or miss their fields (schema), empty rows, conversations
whose roles are out of order or that never reach an assistant turn, assistant turns that the
chat template does not close with the end-of-turn token (the model would never learn to stop),
rows longer than ``data.max_row_tokens`` (errors) or ``model.max_length`` (warnings: truncated),
and, with ``data.require_reasoning``, assistant turns without a closed reasoning block.
Lengths are counted with the same tokenizer and template TRL uses to prepare the rows.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from trainctl.backends.hf.config import DataConfig
from trainctl.backends.hf.rows import Rows
from trainctl.kernel.errors import ConfigError

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(slots=True)
class Finding:
    rule: str
    error: bool
    where: list[str] = field(default_factory=list)  # "line 4 (user after user)"


@dataclass(slots=True)
class Report:
    source: str
    shape: str
    rows: int = 0
    tokens: int = 0
    longest: int = 0
    findings: dict[str, Finding] = field(default_factory=dict)

    def add(self, rule: str, line: int, detail: str = "", *, error: bool = True) -> None:
        finding = self.findings.setdefault(rule, Finding(rule=rule, error=error))
        finding.where.append(f"line {line}" + (f" ({detail})" if detail else ""))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings.values() if f.error]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings.values() if not f.error]

    def lines(self, show: int) -> list[str]:
        mean = self.tokens / self.rows if self.rows else 0
        out = [f"data check: {self.source}: {self.rows} rows ({self.shape}), {self.tokens:,} tokens, "
               f"mean {mean:.0f}, longest {self.longest}"]
        for finding in self.errors + self.warnings:
            more = len(finding.where) - show
            rows = ", ".join(finding.where[:show]) + (f", ... {more} more" if more > 0 else "")
            kind = "error  " if finding.error else "warning"
            out.append(f"  {kind} {finding.rule}: {len(finding.where)} row(s): {rows}")
        return out


def check_rows(files: list[Rows], *, tokenizer: Any, shape: str, mask: str, config: DataConfig, max_length: int,
               report: bool) -> list[str]:
    """Validate every file with the template TRL will use; print the report (``report``: rank 0);
    raise ConfigError on errors. Returns the warnings, one line per rule and file."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if not tokenizer.chat_template and (mask == "assistant_only" or not plain_strings(files, shape)):
        # before TRL's training-template helper, which fails on a missing template with a TypeError
        needs = ("data.mask = assistant_only needs" if plain_strings(files, shape)
                 else f"the {shape} rows are conversations, which need")
        raise ConfigError(
            f"the tokenizer has no chat template and {needs} one; set model.chat_template (a .jinja file or the "
            "template text), or give plain-string prompt/completion or text rows with the default data.mask"
        )
    template = None  # the tokenizer's, or TRL's training template with {% generation %} markers
    if mask == "assistant_only" and not has_generation_markers(tokenizer.chat_template or ""):
        try:
            template = get_training_chat_template(tokenizer)
        except (ValueError, TypeError):
            raise ConfigError(
                "data.mask = assistant_only needs a chat template with {% generation %} markers around assistant "
                "turns, and TRL has no training template for this tokenizer; set model.chat_template to one"
            ) from None
    eos = config.eos_token or tokenizer.eos_token
    reports = [validate(r, shape=shape, mask=mask, tokenizer=tokenizer, template=template, eos=eos, config=config,
                        max_length=max_length, packing=config.packing) for r in files]
    errors = [(r, f) for r in reports for f in r.errors]
    warnings = [f"{f.rule}: {len(f.where)} row(s) of {r.source}" for r in reports for f in r.warnings]
    if report and (errors or warnings):
        print("\n".join(line for r in reports for line in r.lines(config.report_rows)), file=sys.stderr)
    if errors:
        first, finding = errors[0]
        raise ConfigError(
            f"data check failed: {len(errors)} problem(s), first in {first.source}: {finding.rule} at "
            f"{finding.where[0]}; fix the rows listed above"
        )
    return warnings


def plain_strings(files: list[Rows], shape: str) -> bool:
    """Rows that need no chat template: text, or prompt/completion given as strings (TRL then
    tokenizes ``prompt + completion`` as they are, the usual set-up for base models)."""
    if shape == "text":
        return True
    return shape == "prompt_completion" and all(
        not isinstance(row.get("prompt"), list) and not isinstance(row.get("completion"), list)
        for rows in files for row in rows.rows
    )


def validate(rows: Rows, *, shape: str, mask: str, tokenizer: Any, template: str | None, eos: str,
             config: DataConfig, max_length: int, packing: str | bool) -> Report:
    """Check every row of ``rows`` (already read, in the given ``shape``)."""
    report = Report(source=rows.source, shape=shape, rows=len(rows.rows) + len(rows.bad))
    for line, why in rows.bad:
        report.add("not a JSON object", line, why)
    for line, row in zip(rows.lines, rows.rows):
        problems = list(_schema(row, shape, config))
        for rule, detail in problems:
            report.add(rule, line, detail)
        if problems:
            continue
        n, rendered = _tokens(row, shape, tokenizer, template, eos, config.text_field)
        report.tokens += n
        report.longest = max(report.longest, n)
        if config.max_row_tokens and n > config.max_row_tokens:
            report.add(f"longer than data.max_row_tokens {config.max_row_tokens}", line, f"{n} tokens")
        elif n > max_length and packing != "wrapped":
            report.add(f"longer than model.max_length {max_length} (truncated)", line, f"{n} tokens", error=False)
        if rendered is not None:
            for index in _unclosed_turns(row, shape, rendered, eos, config.reasoning_tags[1]):
                report.add(f"assistant turn not closed by the end-of-turn token {eos!r}", line, f"turn {index}")
        if config.require_reasoning:
            for index in _missing_reasoning(row, shape, config.reasoning_tags):
                open_, close = config.reasoning_tags
                report.add(f"no reasoning block {open_}...{close}", line, f"turn {index}")
    if not report.rows:
        report.add("no rows", 0, "the file is empty")
    return report


# --- per-row rules ------------------------------------------------------------------------


def _schema(row: dict[str, Any], shape: str, config: DataConfig) -> Iterator[tuple[str, str]]:
    if shape == "text":
        text = row.get(config.text_field)
        if not isinstance(text, str):
            yield "wrong schema", f"'{config.text_field}' must be a string, got {type(text).__name__}"
        elif not text.strip():
            yield "empty row", ""
    elif shape == "messages":
        yield from _conversation(row.get("messages"), "messages", last="assistant")
    else:
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                yield "empty row", "empty completion"
        elif isinstance(prompt, list) and isinstance(completion, list):
            yield from _conversation(prompt, "prompt", last="user")
            if not completion or any(not isinstance(m, dict) or m.get("role") != "assistant" for m in completion):
                yield "roles out of order", "completion must be assistant turns"
            elif any(not str(m.get("content") or "").strip() for m in completion):
                yield "empty row", "empty completion"
        else:
            yield "wrong schema", "'prompt' and 'completion' must both be strings or both message lists"


def _conversation(messages: Any, key: str, *, last: str) -> Iterator[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        yield "wrong schema", f"'{key}' must be a non-empty list of {{role, content}} objects"
        return
    previous = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            yield "wrong schema", f"{key}[{i}] must be an object with a 'role'"
            return
        role, content = m["role"], m.get("content")
        if role not in ROLES:
            yield "wrong schema", f"{key}[{i}] has unknown role {role!r}"
            return
        if not isinstance(content, str) and not (role == "assistant" and m.get("tool_calls")):
            yield "wrong schema", f"{key}[{i}].content must be a string (text-only training)"
            return
        if not _follows(previous, role):
            yield "roles out of order", f"{role} after {previous or 'the start'}"
            return
        if role == "assistant" and not (content or "").strip() and not m.get("tool_calls"):
            yield "empty row", f"{key}[{i}] is an empty assistant turn"
            return
        previous = role
    if previous != last and not (last == "user" and previous == "tool"):
        yield "roles out of order", f"ends with {previous}, expected {last}"


def _follows(previous: str | None, role: str) -> bool:
    if role in ("system", "developer"):
        return previous is None
    if role == "user":
        return previous in (None, "system", "developer", "assistant", "tool")
    if role == "assistant":
        return previous in ("user", "tool")
    return previous in ("assistant", "tool")  # tool results answer an assistant's call


def _tokens(row, shape, tokenizer, template, eos, text_field) -> tuple[int, str | None]:
    """Token count as TRL will prepare the row, and the rendered conversation (or None)."""
    if shape == "text":
        text = row[text_field]
        return len(tokenizer(text if text.endswith(eos) else text + eos)["input_ids"]), None
    if shape == "prompt_completion" and isinstance(row["prompt"], str):
        completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
        return len(tokenizer(row["prompt"] + completion)["input_ids"]), None
    messages = row["messages"] if shape == "messages" else row["prompt"] + row["completion"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return len(ids), rendered


def _assistant_turns(row: dict[str, Any], shape: str) -> list[dict[str, Any]]:
    if shape == "messages":
        return [m for m in row["messages"] if m.get("role") == "assistant"]
    if shape == "prompt_completion":
        completion = row["completion"]
        return completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    return []


def _unclosed_turns(row, shape, rendered: str, eos: str, close_tag: str) -> Iterator[int]:
    """Assistant turns whose rendered text is not followed by ``eos``. A turn the template
    rewrites beyond recognition (not found in the text) is not judged."""
    cursor = 0
    for index, message in enumerate(_assistant_turns(row, shape), start=1):
        content = (message.get("content") or "").strip()
        if not content:
            continue
        for candidate in (content, content.split(close_tag)[-1].strip()):
            at = rendered.find(candidate, cursor) if candidate else -1
            if at >= 0:
                cursor = at + len(candidate)
                if not rendered[cursor:].lstrip().startswith(eos):
                    yield index
                break


def _missing_reasoning(row, shape, tags: tuple[str, str]) -> Iterator[int]:
    open_, close = tags
    for index, message in enumerate(_assistant_turns(row, shape), start=1):
        if (message.get("reasoning_content") or "").strip():  # the field some templates render as the block
            continue
        content = message.get("content") or ""
        start = content.find(open_)
        if start < 0 or content.find(close, start + len(open_)) < 0:
            yield index
