"""Session fixtures for the ``hf`` backend tests: the tiny tokenizer, a tiny random Llama and
JSONL rows in the three shapes, built once per test session (transformers imported once).

``tests/conftest.py`` imports ``hf`` so every test module can ask for it; nothing here imports
transformers until a test does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import hf_assets

# Offline, quiet, and one intra-op thread: tiny matmuls on 2 shared cores only lose with more.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True, slots=True)
class HFAssets:
    root: Path
    tokenizer: Path
    llama: Path
    text: Path
    messages: Path
    prompt_completion: Path
    plain_tokenizer: Path  # the tokenizer without a chat template (a base model's)

    def sets(self, data: Path | None = None, *extra: str) -> list[str]:
        """``--set`` overrides of a seconds-long hf run on the tiny model."""
        return [
            f"model.name_or_path='{self.llama}'", f"data.train='{data or self.messages}'",
            "model.max_length=128", "train.batch_size=4", "train.grad_accum=2", "train.device='cpu'",
            "train.threads=1", "train.eval_steps=2", "train.log_interval=1", "optim.lr=3e-3",
            "optim.weight_decay=0.0", *extra,
        ]


@pytest.fixture(scope="session")
def hf(tmp_path_factory) -> HFAssets:
    root = tmp_path_factory.mktemp("hf")
    hf_assets.build_tokenizer(root / "tok")
    hf_assets.build_model(root / "llama", root / "tok", arch="llama")
    hf_assets.build_plain_tokenizer(root / "tok_plain", root / "tok")
    return HFAssets(
        root=root, tokenizer=root / "tok", llama=root / "llama",
        text=hf_assets.write_jsonl(root / "text.jsonl", hf_assets.text_rows()),
        messages=hf_assets.write_jsonl(root / "messages.jsonl", hf_assets.message_rows()),
        prompt_completion=hf_assets.write_jsonl(root / "pc.jsonl", hf_assets.prompt_completion_rows()),
        plain_tokenizer=root / "tok_plain",
    )
