"""Loading an ``hf`` checkpoint for inference alone (``trainctl sample``): the directory is a
``save_pretrained`` model (or a LoRA adapter over the base model its ``adapter_config.json``
names) with its tokenizer and chat template, so no run config is needed, and no training data is
read.

The directory is checked before anything loads: safetensors weights only (``use_safetensors``:
a pickled ``pytorch_model.bin`` is never read) and no remote code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainctl.backends.hf import inference
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.safe_load import UNREADABLE_WEIGHTS

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(slots=True)
class Loaded:
    """What :func:`trainctl.backends.hf.inference.generate` reads of a backend."""

    model: Any
    tokenizer: Any
    device: torch.device
    shape: str  # "messages": prompts go through the chat template as a user turn; "text": as they are


def load(directory: Path, device: str = "cpu", *, chat_template: bool = True) -> Loaded:
    """The checkpoint ``directory`` for generation on ``device``. ``chat_template=False``: prompts
    are plain strings even when the tokenizer has a template (a model trained on plain text)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from trainctl.backends.hf.loading import is_vision_language
    from trainctl.backends.hf.sft import quiet

    adapter = directory / ADAPTER_CONFIG
    base = directory
    if adapter.is_file():
        try:
            base = json.loads(adapter.read_text())["base_model_name_or_path"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{adapter} is not a peft adapter config (no base_model_name_or_path)") from None
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{adapter}: base_model_name_or_path must name the base model")
    try:
        with quiet():
            config = AutoConfig.from_pretrained(base)
            auto = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
            model = auto.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
            if adapter.is_file():
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(directory))
            tokenizer = AutoTokenizer.from_pretrained(directory)
    except (*UNREADABLE_WEIGHTS, ValueError, ImportError) as exc:
        raise ConfigError(f"cannot load the hf checkpoint {directory} (base {base}): {str(exc).strip().splitlines()[0]}") from None
    dev = torch.device(device)
    return Loaded(model=model.to(dev).eval(), tokenizer=tokenizer, device=dev,
                  shape="messages" if chat_template and tokenizer.chat_template else "text")


def sample(loaded: Loaded, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int | None, seed: int) -> str:
    """Text after ``prompt``; ``temperature`` 0 decodes greedily (``do_sample=False``)."""
    return inference.generate(loaded, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
