"""What an ``hf`` checkpoint holds, written into the directory the checkpoint plugin gives:

- the weights in Hugging Face format (``save_pretrained``: ``model.safetensors`` or its shards,
  ``config.json``, ``generation_config.json``), or with LoRA the adapter (``adapter_model.safetensors``,
  ``adapter_config.json``): ``from_pretrained`` / ``PeftModel.from_pretrained`` load them as-is;
- the tokenizer with its chat template;
- ``optimizer.pt`` (optimizer and grad-scaler state) and ``rng-rank{N}.pt`` (torch RNG per rank), plain
  tensors and dicts that load with ``torch.load(weights_only=True)``;
- ``trainer_state.json``: the step, the last learning rate and how the data order is derived;
  with ``data.streaming`` the stream's position before the next step (``stream.py``).
  There is no scheduler object to save: the learning rate is the kernel's pure function of the
  step, and the rows of a step are a pure function of (seed, step), so restoring the step (the
  kernel's ``kernel.json``) restores both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trainctl.backends import sharded_checkpoint
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.safe_load import load_safetensors

TRAINER_STATE = "trainer_state.json"
ADAPTER = "adapter_model.safetensors"


def save(backend: Any, directory: Path) -> None:
    """Every rank its RNG (and under FSDP its shard of the weights and optimizer: the
    ``sharded_checkpoint`` layout); rank 0 the rest (the same on every rank under DDP)."""
    from trainctl.backends.hf.sft import quiet

    full = backend.stepper.save(directory, backend.model)
    if backend.ctx.dist.rank != 0:
        return
    model = backend.model

    def save_pretrained(state: dict[str, torch.Tensor], _pg: Any) -> None:
        with quiet():  # save_pretrained draws a progress bar per shard
            model.save_pretrained(directory, state_dict=state)  # PeftModel: the adapter only; else the full model

    if full:
        sharded_checkpoint.write(dict(model.state_dict()), save_pretrained)
    with quiet():
        backend.tokenizer.save_pretrained(directory)
    state = {
        "global_step": backend.steps_done,
        "learning_rate": backend.stepper.lr,
        "seed": backend.ctx.seed,
        "data_order": "rows of step s, micro-batch m: positions (s*grad_accum+m)*batch_size.. of a "
                      "permutation seeded by (seed, epoch) per epoch" if backend.data_cfg.shuffle else "file order",
        "lora": backend.hf.lora is not None,
        "objective": backend.hf.objective,  # dpo: the reference is rebuilt from model.name_or_path, not saved
    }
    if getattr(backend, "stream", None) is not None:  # data.streaming: where the next step's rows start
        state["stream"] = backend.stream.state(backend.steps_done)
    (directory / TRAINER_STATE).write_text(json.dumps(state, indent=1))


def load(backend: Any, directory: Path) -> None:
    state = json.loads((directory / TRAINER_STATE).read_text())
    objective = state.get("objective", "sft")  # checkpoints from before DPO are SFT's
    if objective != backend.hf.objective:
        raise ConfigError(f"checkpoint {directory} was trained with [hf] objective = {objective!r}, not {backend.hf.objective!r}; "
                          "resume with the same objective, or start a new run from it (model.name_or_path = that directory)")
    if sharded_checkpoint.is_sharded_checkpoint(directory):
        pass  # the stepper reads the weights with the optimizer
    elif backend.hf.lora is not None:
        _load_adapter(backend.model, directory, backend.stepper.parallel)
    else:
        _load_full(backend.model, directory)
    if getattr(backend, "stream", None) is not None:
        backend.stream.restore(state.get("stream"), directory, int(state["global_step"]))
    elif "stream" in state:
        raise ConfigError(f"checkpoint {directory} was trained on a stream (data.streaming = true): its rows are not this "
                          "run's; resume with data.streaming = true, or start a new run from its weights")
    backend.stepper.load(directory, backend.model)
    backend.steps_done = int(state["global_step"])


def _load_adapter(model: Any, directory: Path, parallel: Any) -> None:
    from peft import set_peft_model_state_dict

    file = directory / ADAPTER
    if not file.is_file():
        raise ConfigError(f"checkpoint {directory} has no LoRA adapter ({ADAPTER}); it was saved without [hf.lora]")
    adapter = load_safetensors(file)
    if parallel.sharded:  # the adapter's names as the model has them, loaded into the shards (strict=False: the base stays)
        _load_sharded_adapter(model, adapter, parallel, directory)
        return
    try:
        result = set_peft_model_state_dict(model, adapter)
    except RuntimeError as exc:  # shapes differ: r or target modules changed
        raise ConfigError(f"checkpoint {directory}: the LoRA adapter does not fit ([hf.lora] changed?): {str(exc).splitlines()[0]}") from None
    if result.unexpected_keys:
        raise ConfigError(f"checkpoint {directory}: adapter weights the model has no place for ({result.unexpected_keys[0]}, ...); was [hf.lora] changed?")


def _load_sharded_adapter(model: Any, adapter: dict, parallel: Any, directory: Path) -> None:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    name = model.active_adapter
    state = {k.replace(".weight", f".{name}.weight"): v for k, v in adapter.items()}
    if set(state) != names:
        raise ConfigError(f"checkpoint {directory}: the LoRA adapter does not fit the model's ([hf.lora] changed?)")
    try:
        parallel.load_weights(model, state, strict=False)
    except (RuntimeError, ValueError) as exc:  # shapes differ: r changed
        raise ConfigError(f"checkpoint {directory}: the LoRA adapter does not fit ([hf.lora] changed?): {str(exc).splitlines()[0]}") from None


def _load_full(model: Any, directory: Path) -> None:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (directory / name).is_file():
            raise ConfigError(f"checkpoint {directory} has no {name}; it was saved with [hf.lora] or is not an hf checkpoint")
        state.update(load_safetensors(directory / name))
    if sharded_checkpoint.is_sharded(model):
        sharded_checkpoint.load_full_weights(model, state)
        return
    result = model.load_state_dict(state, strict=False)
    # a tied weight (lm_head = embed_tokens) is saved once: missing names must share a loaded tensor
    params = dict(model.named_parameters(remove_duplicate=False))
    shared: dict[int, set[str]] = {}
    for name, p in params.items():
        shared.setdefault(id(p), set()).add(name)
    loaded = set(state)
    missing = [k for k in result.missing_keys if k not in params or not shared[id(params[k])] & loaded]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise ConfigError(f"checkpoint {directory} does not match the model ({bad}, ...); was model.name_or_path changed?")
