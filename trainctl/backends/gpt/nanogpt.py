"""Starting a ``gpt`` model from existing weights (``[model] init_from``): a nanoGPT ``ckpt.pt``
or a trainctl checkpoint directory. Weights only: the optimizer, step and schedule start fresh,
as for any fine-tune.

nanoGPT's ``ckpt.pt`` is ``{"model": state_dict, "model_args": {...}, "optimizer": ...,
"iter_num": int, "best_val_loss": tensor, "config": {...}}`` — tensors and plain values, so it
loads with ``torch.load(weights_only=True)``. Its quirks, handled here:

- a model trained with ``compile=True`` prefixes every key with ``_orig_mod.``;
- older versions keep a causal-mask buffer ``transformer.h.N.attn.bias`` (we use SDPA: dropped);
- ``lm_head.weight`` and ``transformer.wte.weight`` are one tied tensor: either name suffices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from trainctl.kernel.safe_load import load_safetensors

from trainctl.backends.gpt.model import GPT, GPTConfig
from trainctl.kernel.errors import ConfigError

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
COMPILED_PREFIX = "_orig_mod."
TIED = ("lm_head.weight", "transformer.wte.weight")


def init_weights(model: GPT, source: str, args: GPTConfig) -> str:
    """Load ``source``'s weights into ``model`` (shapes must match ``args``); returns a one-line
    note for the plan."""
    path = Path(source)
    if path.is_dir():
        state, note = _trainctl_checkpoint(path), f"weights of {path}"
    elif path.is_file():
        ckpt = _load(path)
        state = _nanogpt_state(ckpt, args, path)
        note = f"weights of nanoGPT {path} (iter {ckpt.get('iter_num', '?')})"
    else:
        raise ConfigError(f"model.init_from {source}: no such file or directory; give a nanoGPT ckpt.pt, a checkpoint directory or 'scratch'")
    missing, unexpected = _keys_diff(model, state)
    if missing or unexpected:
        raise ConfigError(
            f"model.init_from {path}: the weights do not fit this model "
            f"(missing {', '.join(missing[:4]) or 'none'}; unexpected {', '.join(unexpected[:4]) or 'none'})"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"model.init_from {path}: {str(exc).splitlines()[-1].strip()}") from None
    return note


def _load(path: Path) -> dict[str, Any]:
    import pickle
    import warnings

    from trainctl.kernel.safe_load import unpickling_reason

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"model.init_from {path}: refused, it holds more than tensors and plain values ({unpickling_reason(exc)})") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise ConfigError(f"model.init_from {path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("model_args"), dict):
        raise ConfigError(f"model.init_from {path}: not a nanoGPT checkpoint (expected a dict with 'model' and 'model_args')")
    return ckpt


def _nanogpt_state(ckpt: dict[str, Any], args: GPTConfig, path: Path) -> dict[str, torch.Tensor]:
    theirs = ckpt["model_args"]
    diffs = []
    for key in SHAPE_KEYS:
        value, ours = theirs.get(key), getattr(args, key)
        if key == "block_size" and isinstance(value, int) and value > ours:
            continue  # a shorter context is fine: the position table is cropped (as nanoGPT does)
        if value != ours:
            diffs.append(f"model.{key} is {value!r} in the checkpoint but {ours!r} here")
    if diffs:
        raise ConfigError(f"model.init_from {path}: {'; '.join(diffs)}; set the checkpoint's values in [model]")
    state = {}
    for key, tensor in ckpt["model"].items():
        key = key.removeprefix(COMPILED_PREFIX)
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the causal-mask buffer of older nanoGPT: SDPA masks by itself
        state[key] = tensor
    for a, b in (TIED, TIED[::-1]):
        if a not in state and b in state:
            state[a] = state[b]
    wpe = "transformer.wpe.weight"
    if wpe in state and state[wpe].shape[0] > args.block_size:
        state[wpe] = state[wpe][: args.block_size].clone()
    return state


def _trainctl_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from trainctl.backends.gpt.inference import WEIGHTS
    from trainctl.kernel.checkpoint_files import verify

    problem = verify(path)
    if problem:
        raise ConfigError(f"model.init_from {path}: not a complete checkpoint ({problem})")
    if (path / ".metadata").is_file():  # sharded (FSDP): read whole, in this process, as trainctl sample does
        from trainctl.backends.gpt.inference import load_for_inference

        return dict(load_for_inference(path)[0].state_dict())
    state = load_safetensors(path / WEIGHTS)
    for a, b in (TIED, TIED[::-1]):
        if a not in state and b in state:
            state[a] = state[b]
    return state


def _keys_diff(model: GPT, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    wanted = set(model.state_dict())
    return sorted(wanted - set(state)), sorted(set(state) - wanted)
