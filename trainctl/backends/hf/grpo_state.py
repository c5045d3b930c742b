"""The GRPO producer's part of a checkpoint: what the next step reads besides the weights, the
optimizer and the torch RNG (``weights.py``), so that a resumed run is the run it continues.

- ``grpo_state.json``: TRL's micro-batch counter ``_step``, the policy version of the buffered
  generation, ``state.num_input_tokens_seen`` (TRL's ``num_tokens``), how many generation batches
  of the dataloader's current pass were handed out, and the settings the stream depends on;
- ``grpo_state.safetensors``: the buffered generation (``_buffered_inputs``: ``steps_per_generation``
  micro-batches of prompt and completion ids, masks, advantages, old and reference log-probs,
  reused for ``num_iterations x steps_per_generation`` micro-batches) and the state of
  ``RepeatSampler``'s generator before it drew the current pass's order.

On several ranks the counters, the sampler's generator and the dataloader's place (counted in
each rank's own generation batches) are the same on every rank, and rank 0 writes the JSON; the
buffer is each rank's share of the generation, so every rank writes its own tensors file
(``grpo_state-rank{N}.safetensors``, rank 0's keeping the one-process name). A resume at another
number of ranks is refused: the buffers are split by rank and the dataloader's place counts
per-rank batches, so neither carries over exactly.

Generation samples from the global torch generator (transformers' ``generate``; TRL's shuffle of
the buffered batch too), which ``rng-rank0.pt`` restores. Both files are read as hostile: bounded
regular files, JSON without NaN, tensors through safetensors, and every value checked (ids inside
the vocabulary, masks of 0 and 1, shapes of the configured batch) before the run touches it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from trainctl.kernel.errors import ConfigError
from trainctl.kernel.resume import BadCheckpoint, read_bounded
from trainctl.kernel.safe_load import UNREADABLE_WEIGHTS, weights_refused

STATE_FILE = "grpo_state.json"
TENSORS_FILE = "grpo_state.safetensors"  # rank 0's; rank N's is tensors_file(N)
FORMAT = 1
MAX_JSON_BYTES = 1 << 20  # a few hundred bytes in practice
MAX_TENSOR_BYTES = 1 << 31  # the buffer of a large run is tens of MB
MAX_COUNT = 1 << 40
GENERATOR = "sampler_generator"
IDS, MASKS = ("prompt_ids", "completion_ids"), ("prompt_mask", "completion_mask")
PER_TOKEN = ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps")  # (B, C) floats
REQUIRED = (*IDS, *MASKS, "advantages", "num_items_in_batch")


@dataclass(kw_only=True, slots=True)
class ProducerState:
    """What :class:`trainctl.backends.hf.grpo.InProcessRollouts` needs to go on where it stopped."""

    step: int  # TRL's _step: micro-batches prepared so far
    generated_version: int  # the policy version of the buffered generation
    tokens_seen: int  # TRL's state.num_input_tokens_seen
    consumed: int  # generation batches of the current dataloader pass handed out (0: none yet)
    pass_start: torch.Tensor | None  # RepeatSampler's generator before this pass's order (None: no shuffle)
    buffered: list[dict[str, torch.Tensor]] | None  # TRL's _buffered_inputs


@dataclass(frozen=True, kw_only=True, slots=True)
class Expected:
    """What this run can take: the checkpoint's state must fit it."""

    settings: dict[str, Any]  # the stream's settings, as this run has them
    defaults: dict[str, Any]  # their defaults: a key a checkpoint lacks (older than the key) was at its default
    batch_size: int  # completions per micro-batch
    micro_batches: int  # steps_per_generation: micro-batches per buffered generation
    max_completion_length: int
    vocab_size: int
    passes: int  # generation batches per dataloader pass
    shuffles: bool  # RepeatSampler shuffles: a pass under way needs its generator state
    rank: int = 0  # whose buffer this process reads
    world_size: int = 1


def tensors_file(rank: int) -> str:
    return TENSORS_FILE if rank == 0 else f"grpo_state-rank{rank}.safetensors"


def save(directory: Path, state: ProducerState, settings: dict[str, Any], *, rank: int = 0, world_size: int = 1) -> None:
    """Every rank its tensors file; rank 0 the JSON (the same counters on every rank)."""
    from safetensors.torch import save_file

    tensors = {f"buffer.{i}.{name}": value.detach().to("cpu").contiguous().clone()  # clone: the slices share storage
               for i, micro in enumerate(state.buffered or []) for name, value in micro.items() if value is not None}
    if state.pass_start is not None:
        tensors[GENERATOR] = state.pass_start.clone()
    save_file(tensors, str(directory / tensors_file(rank)))
    if rank:
        return
    record = {"format": FORMAT, "step": state.step, "generated_version": state.generated_version,
              "tokens_seen": state.tokens_seen, "consumed": state.consumed, "buffered": state.buffered is not None,
              "world_size": world_size, "settings": settings}
    (directory / STATE_FILE).write_text(json.dumps(record, indent=1))


def load(directory: Path, expected: Expected, device: torch.device) -> ProducerState:
    """The checkpoint's producer state, checked against this run; a one-line ConfigError naming
    the file and the way out otherwise."""
    record = _record(directory)
    saved = {key: record["settings"].get(key, expected.defaults.get(key)) for key in expected.settings}
    changed = [f"{key}: {_show(saved[key])} -> {_show(value)}" for key, value in expected.settings.items()
               if saved[key] != value]
    if changed:
        raise ConfigError(f"cannot resume from {directory}: the GRPO stream's settings differ ({'; '.join(changed)}); "
                          "restore them, or start a new run from its weights with "
                          f"model.name_or_path = '{directory}' and --resume never")
    if record["world_size"] != expected.world_size:
        raise ConfigError(f"cannot resume from {directory}: GRPO wrote it on {record['world_size']} rank(s) and this run "
                          f"has {expected.world_size} (each rank's buffered generation and place in the prompts are its "
                          f"own); resume with {record['world_size']}, or start a new run from its weights with "
                          f"model.name_or_path = '{directory}' and --resume never")
    if record["consumed"] > expected.passes:
        _refuse(directory, STATE_FILE, f"consumed = {record['consumed']} is past the {expected.passes} batches of a pass")
    name = tensors_file(expected.rank)
    tensors = _tensors(directory, name)
    buffered = _buffer(directory, name, tensors, expected) if record["buffered"] else None
    if not record["buffered"] and any(key.startswith("buffer.") for key in tensors):
        _refuse(directory, name, "holds a buffered generation that grpo_state.json says is not there")
    pass_start = tensors.pop(GENERATOR, None)
    if pass_start is not None and not is_generator_state(pass_start):
        _refuse(directory, name, f"'{GENERATOR}' is not a CPU generator state")
    if record["consumed"] and expected.shuffles and pass_start is None:
        _refuse(directory, name, f"lacks '{GENERATOR}', the prompt order of the pass under way")
    return ProducerState(step=record["step"], generated_version=record["generated_version"],
                         tokens_seen=record["tokens_seen"], consumed=record["consumed"], pass_start=pass_start,
                         buffered=[{k: v.to(device) for k, v in micro.items()} for micro in buffered] if buffered else None)


def is_generator_state(value: Any) -> bool:
    """``value`` has the dtype and shape of a CPU ``torch.Generator``'s state."""
    cpu_state = torch.Generator().get_state()
    return isinstance(value, torch.Tensor) and value.dtype == cpu_state.dtype and value.shape == cpu_state.shape


def _record(directory: Path) -> dict[str, Any]:
    if not (directory / STATE_FILE).exists() and not (directory / STATE_FILE).is_symlink():
        raise ConfigError(f"checkpoint {directory} has no {STATE_FILE} (the GRPO producer's state; checkpoints written "
                          "before GRPO could resume lack it): start a new run from its weights with "
                          f"model.name_or_path = '{directory}' and --resume never")
    try:
        record = json.loads(read_bounded(directory / STATE_FILE, MAX_JSON_BYTES), parse_constant=_no_constant)
    except BadCheckpoint as exc:
        _refuse(directory, STATE_FILE, str(exc).removeprefix(STATE_FILE + " "))
    except ValueError as exc:
        _refuse(directory, STATE_FILE, f"is not valid JSON ({str(exc).splitlines()[0][:120]})")
    except RecursionError:
        _refuse(directory, STATE_FILE, "is not valid JSON (nested too deeply)")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        _refuse(directory, STATE_FILE, f"is not a format-{FORMAT} GRPO producer state")
    for key in ("step", "generated_version", "tokens_seen", "consumed"):
        value = record.get(key)
        if type(value) is not int or not 0 <= value <= MAX_COUNT:
            _refuse(directory, STATE_FILE, f"{key} = {json.dumps(value)[:40]} is not a whole number from 0 to {MAX_COUNT}")
    if type(record.get("buffered")) is not bool or not isinstance(record.get("settings"), dict):
        _refuse(directory, STATE_FILE, "buffered is not true/false or settings is not a table")
    record.setdefault("world_size", 1)  # written by one process before GRPO ran on several
    if type(record["world_size"]) is not int or not 1 <= record["world_size"] <= MAX_COUNT:
        _refuse(directory, STATE_FILE, f"world_size = {json.dumps(record['world_size'])[:40]} is not a number of ranks")
    return record


def _tensors(directory: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        data = read_bounded(directory / name, MAX_TENSOR_BYTES)
    except BadCheckpoint as exc:
        _refuse(directory, name, str(exc).removeprefix(name + " "))
    try:
        return load(data)
    except UNREADABLE_WEIGHTS as exc:
        raise weights_refused(directory / name, exc) from None
    except Exception as exc:  # noqa: BLE001 - whatever hostile bytes make the parser raise: one line
        raise weights_refused(directory / name, exc) from None


def _buffer(directory: Path, file: str, tensors: dict[str, torch.Tensor],
            expected: Expected) -> list[dict[str, torch.Tensor]]:
    """``tensors``' buffered micro-batches, each checked as TRL's loss will read it."""
    micro: list[dict[str, torch.Tensor]] = [{} for _ in range(expected.micro_batches)]
    for key, value in tensors.items():
        if key == GENERATOR:
            continue
        _, index, name = (key.split(".", 2) + ["", ""])[:3]
        if not (key.startswith("buffer.") and index.isdigit() and int(index) < expected.micro_batches
                and name in (*REQUIRED, *PER_TOKEN)):
            _refuse(directory, file, f"holds {key!r}, which no buffered micro-batch of this run has")
        micro[int(index)][name] = value
    names = set(micro[0])
    for i, batch in enumerate(micro):
        problem = micro_problem(batch, names, expected)
        if problem:
            _refuse(directory, file, f"buffered micro-batch {i}: {problem}")
    return micro


def micro_problem(batch: dict[str, Any], names: set[str], expected: Expected) -> str | None:
    """What makes ``batch`` no micro-batch TRL's loss may read for this run (None: nothing): the
    tensors ``names`` and no others, shapes of the configured batch, ids inside the vocabulary,
    masks of 0 and 1, finite floats. For a checkpoint's buffer and a rollout worker's answer."""
    if not all(isinstance(value, torch.Tensor) for value in batch.values()):
        return "holds values that are not tensors"
    unknown = sorted(set(batch) - {*REQUIRED, *PER_TOKEN})
    if unknown:
        return f"holds {', '.join(map(_show, unknown[:3]))}, which no micro-batch of this run has"
    missing = [name for name in REQUIRED if name not in batch]
    if missing or set(batch) != names:
        return f"lacks {', '.join(missing)}" if missing else "holds other tensors than micro-batch 0"
    b = expected.batch_size
    prompt, completion = batch["prompt_ids"], batch["completion_ids"]
    if prompt.dim() != 2 or prompt.shape[0] != b or completion.dim() != 2 or completion.shape[0] != b:
        return f"prompt_ids and completion_ids are not ({b}, length) ({tuple(prompt.shape)}, {tuple(completion.shape)})"
    if completion.shape[1] > expected.max_completion_length:
        return (f"completions of {completion.shape[1]} tokens are longer than max_completion_length "
                f"{expected.max_completion_length}")
    shapes = {"prompt_mask": prompt.shape, "completion_mask": completion.shape, "advantages": (b,),
              "num_items_in_batch": (), **{name: completion.shape for name in PER_TOKEN}}
    for name, value in batch.items():
        if tuple(value.shape) != tuple(shapes.get(name, value.shape)):
            return f"{name} has shape {tuple(value.shape)}, not {tuple(shapes[name])}"
        floating = name == "advantages" or name in PER_TOKEN
        if value.is_floating_point() != floating or (not floating and value.dtype != torch.int64):
            return f"{name} is {value.dtype}, not {'a floating type' if floating else 'int64'}"
        if floating and not bool(torch.isfinite(value).all()):
            return f"{name} holds NaN or infinite values"
    for name in IDS:
        if batch[name].numel() and not 0 <= int(batch[name].min()) <= int(batch[name].max()) < expected.vocab_size:
            return f"{name} holds ids outside the vocabulary of {expected.vocab_size}"
    for name in MASKS:
        if not bool(((batch[name] == 0) | (batch[name] == 1)).all()):
            return f"{name} holds values other than 0 and 1"
    if int(batch["num_items_in_batch"]) < 0:
        return "num_items_in_batch is negative"
    return None


def _refuse(directory: Path, name: str, problem: str) -> NoReturn:
    raise ConfigError(f"cannot resume from {directory}: {name} {problem}; resume from another checkpoint with "
                      f"--resume PATH, or start a new run from its weights with model.name_or_path = '{directory}' "
                      "and --resume never")


def _show(value: Any) -> str:
    text = repr(value)  # a crafted file's value: one line, and short
    return text if len(text) <= 70 else text[:67] + "..."


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
