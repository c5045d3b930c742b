"""Prepared datasets for mixture tests, cut from the corpus the package embeds: three byte-level
sources of different sizes and one character-level (a vocabulary of its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainctl.backends.gpt.data import embedded_text, prepare


@pytest.fixture(scope="session")
def mixture_sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixture")
    text = embedded_text()
    third = len(text) // 3
    parts = {"plays": text[:third], "more": text[third : 2 * third], "small": text[2 * third : 2 * third + 40_000]}
    made = {}
    for name, part in parts.items():
        (root / f"{name}.txt").write_text(part, encoding="utf-8")
        prepare(root / f"{name}.txt", root / name, "byte")
        made[name] = root / name
    prepare(root / "plays.txt", root / "chars", "char")
    made["chars"] = root / "chars"
    return made


def mixture_sets(sources: dict[str, Path], weights: dict[str, float]) -> list[str]:
    """``--set`` values for ``[[data.sources]]`` of these sources with these weights."""
    tables = ", ".join(f'{{path = "{sources[name]}", weight = {w}}}' for name, w in weights.items())
    return [f"data.sources=[{tables}]"]
