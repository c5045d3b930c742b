"""What the trainer and a rollout worker send each other over HTTP, as safetensors bytes (never
pickle): tensors by name, everything else as JSON in the safetensors metadata (key ``json``).

    POST /batch   trainer -> worker: batch n, and the prompt stream's position at batch ``base``
                  (the stream after the last batch the trainer took; the worker goes on from it
                  when it is not already at n, e.g. after a restart, skipping base .. n - 1)
    200           worker -> trainer: batch n (``grpo_offpolicy.Generated``): the micro-batches
                  (TRL's inputs + sampling_per_token_logps), version, metrics, position after it
    503           JSON {"waiting": why}: no weights of a version >= n - k yet; ask again
    500           JSON {"error": one line, "config": true if the config's fault (a reward raised)}:
                  generation failed, the run fails with the line
"""

from __future__ import annotations

import json
from typing import Any

from trainctl.backends.hf.grpo_offpolicy import Generated
from trainctl.backends.hf.grpo_state import Expected, ProducerState, is_generator_state, micro_problem

MAX_REQUEST_BYTES = 1 << 20  # a position: a few numbers and RepeatSampler's generator state
MAX_BATCH_BYTES = 1 << 30


def _pack(tensors: dict[str, Any], doc: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    plain = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}  # views of one buffer: own copies
    return save(plain, metadata={"json": json.dumps(doc)})


def _unpack(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, doc); ValueError if ``data`` is not safetensors with a JSON object in its metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # load() checked it
        doc = json.loads(header.get("__metadata__", {}).get("json", "null"))
    except (SafetensorError, ValueError, RuntimeError, AttributeError) as exc:
        raise ValueError(f"not a safetensors message ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise ValueError("a safetensors message without its JSON metadata")
    return tensors, doc


def _position_doc(state: ProducerState) -> dict[str, int]:
    return {"step": state.step, "generated_version": state.generated_version, "tokens_seen": state.tokens_seen,
            "consumed": state.consumed}


def _position(doc: dict[str, Any], pass_start: Any) -> ProducerState:
    values = {key: doc[key] for key in ("step", "generated_version", "tokens_seen", "consumed")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values.values()):
        raise ValueError(f"a position of non-negative integers was expected, not {values}")
    if pass_start is not None and not is_generator_state(pass_start):
        raise ValueError("the position's pass_start is not a CPU generator state")
    return ProducerState(**values, pass_start=pass_start, buffered=None)


def request(n: int, base: int, position: ProducerState) -> bytes:
    tensors = {} if position.pass_start is None else {"pass_start": position.pass_start}
    return _pack(tensors, {"n": n, "base": base, "position": _position_doc(position)})


def read_request(data: bytes) -> tuple[int, int, ProducerState]:
    """(n, base, position); ValueError for anything else."""
    tensors, doc = _unpack(data)
    n, base = doc.get("n"), doc.get("base")
    if not (isinstance(n, int) and isinstance(base, int) and 0 <= base <= n) or not isinstance(doc.get("position"), dict):
        raise ValueError("a batch request needs integers 0 <= base <= n and a position")
    return n, base, _position(doc["position"], tensors.get("pass_start"))


def batch(done: Generated) -> bytes:
    tensors: dict[str, Any] = {}
    values: list[dict[str, Any]] = []  # each micro-batch's non-tensor inputs (TRL's num_items_in_batch, None)
    for i, inputs in enumerate(done.micro):
        values.append({})
        for key, value in inputs.items():
            if hasattr(value, "detach"):
                tensors[f"{i}/{key}"] = value
            else:
                values[i][key] = value
    if done.position.pass_start is not None:
        tensors["position/pass_start"] = done.position.pass_start
    return _pack(tensors, {"micro": values, "version": done.version, "metrics": done.metrics,
                           "position": _position_doc(done.position), "generation_s": done.generation_s})


def read_batch(data: bytes, device: Any, expected: Expected) -> Generated:
    """The worker's batch, its tensors on ``device``; ValueError if it is not one this run can
    train on: each micro-batch is checked as a checkpoint's buffer is (``grpo_state.micro_problem``:
    shapes of the configured batch, ids inside the vocabulary, masks of 0 and 1, finite floats)."""
    tensors, doc = _unpack(data)
    try:
        micro = [dict(values) for values in doc["micro"]]
        for name, tensor in tensors.items():
            where, _, key = name.partition("/")
            if where != "position":
                micro[int(where)][key] = tensor
        position = _position(doc["position"], tensors.get("position/pass_start"))
        metrics = {str(k): [float(v) for v in vs] for k, vs in doc["metrics"].items()}
        version = doc["version"]
        done = Generated(micro=micro, version=version, metrics=metrics, position=position,
                         generation_s=float(doc["generation_s"]))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"not a batch ({type(exc).__name__}: {exc})") from None
    if type(version) is not int or version < 0:
        raise ValueError(f"a batch of version {str(version)[:40]}, not a whole number")
    if len(micro) != expected.micro_batches:
        raise ValueError(f"a batch of {len(micro)} micro-batches, not this run's {expected.micro_batches}")
    if position.consumed > expected.passes:
        raise ValueError(f"a position {position.consumed} batches into a pass of {expected.passes}")
    names = set(micro[0])
    for i, inputs in enumerate(micro):
        problem = micro_problem(inputs, names, expected)
        if problem:
            raise ValueError(f"a batch whose micro-batch {i} {problem}")
    done.micro = [{key: value.to(device) for key, value in inputs.items()} for inputs in micro]
    return done
