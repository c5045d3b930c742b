"""Reward functions for the GRPO tests, importable as ``"tests.grpo_rewards:<name>"``."""

from __future__ import annotations

import json
import os

LOG_ENV = "TRAINCTL_TEST_COMPLETIONS"  # a file `recorded` appends each call's completion ids to (a CLI run's)
SEEN: list[list[list[int]]] = []  # the completion ids each call of `recorded` scored, in order


def e_share(prompts, completions, rows):
    """The share of 'e' among a completion's characters: a dense, deterministic reward."""
    return [c.count("e") / max(len(c), 1) for c in completions]


def recorded(prompts, completions, rows):
    """``e_share``, recording the completion token ids it was given (TRL passes them as a column)."""
    SEEN.append([list(row["completion_ids"]) for row in rows])
    if os.environ.get(LOG_ENV):
        with open(os.environ[LOG_ENV], "a", encoding="utf-8") as f:
            f.write(json.dumps(SEEN[-1]) + "\n")
    return e_share(prompts, completions, rows)


def raises(prompts, completions, rows):
    raise RuntimeError("the grader is down")


def raises_where_told(prompts, completions, rows):
    """e_share, except in a process started with TRAINCTL_TEST_GRADER_DOWN=1 (a rollout worker)."""
    if os.environ.get("TRAINCTL_TEST_GRADER_DOWN") == "1":
        raise RuntimeError("the grader is down")
    return e_share(prompts, completions, rows)


def nan(prompts, completions, rows):
    return [float("nan")] * len(completions)


def short(prompts, completions, rows):
    return [1.0] * (len(completions) - 1)
