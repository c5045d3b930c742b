"""Loading a ``gpt`` checkpoint for inference alone (``trainctl sample``): the checkpoint carries
its model shape (``model.json``) and tokenizer (``data_meta.json``), no config needed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainctl.backends import sharded_checkpoint
from trainctl.backends.gpt.data import Tokenizer
from trainctl.backends.gpt.model import GPT, GPTConfig
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.safe_load import load_safetensors_into

# Files of a gpt checkpoint that inference needs (the backend writes them).
WEIGHTS = "model.safetensors"
MODEL_ARGS = "model.json"
DATA_META = "data_meta.json"


def load_for_inference(directory: Path, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    try:
        args = json.loads((directory / MODEL_ARGS).read_text())
        meta = json.loads((directory / DATA_META).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{directory} is not a gpt checkpoint ({Path(exc.filename).name} missing)") from None
    model = GPT(GPTConfig(**args))
    if sharded_checkpoint.is_sharded_checkpoint(directory):  # FSDP's shards, read whole in this one process
        sharded_checkpoint.load_sharded(directory, model, None, {})
    else:
        load_safetensors_into(model, directory / WEIGHTS, device)
    return model.to(device).eval(), Tokenizer(meta)


@torch.no_grad()
def sample(model: GPT, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int, temperature: float,
           top_k: int | None, seed: int, device: str = "cpu") -> str:
    ids = tokenizer.encode(prompt) or [0]
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return tokenizer.decode(out[0, len(ids):].tolist())
