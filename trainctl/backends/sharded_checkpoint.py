"""Weights and optimizer state in a checkpoint, whatever the strategy, through PyTorch
Distributed Checkpoint (DCP). Both backends write and read them through this module.

Two layouts, one per strategy, each readable by the other (DCP reshards):

- **full** (one process, DDP): rank 0 writes ``model.safetensors`` (or ``save_pretrained``) and
  ``optimizer.pt``; what existing tools (``from_pretrained``, nanoGPT scripts) read as-is.
- **sharded** (FSDP: the parameters are DTensors): every rank writes its own shard of the model
  and optimizer in one ``dcp.save`` (``__RANK_0.distcp``) and DCP's coordinator ``.metadata``;
  plain file names, so the manifest lists them like any other file.

Loading reads either layout into either kind of model, on any number of ranks:

    checkpoint \\ model    plain (1 process, DDP)                 sharded (FSDP)
    full                   load_state_dict (today's path)          set_state_dict(full_state_dict=True)
    sharded                dcp.load into full tensors (no PG ok)   dcp.load (reshards to this mesh)

Async saves: inside :func:`trainctl.kernel.staging.staging` every write here copies its state to
CPU memory (DCP's ``DefaultStager``; the loop waits for that only) and defers the file write.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainctl.backends import dcp_metadata
from trainctl.backends.finite_update import parts
from trainctl.kernel import staging
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.safe_load import unpickling_reason

METADATA = dcp_metadata.METADATA  # DCP's global plan: which rank's file holds which piece
SHARD_SUFFIX = ".distcp"


def is_sharded(model: nn.Module) -> bool:
    """The model's parameters are spread over ranks (FSDP2: DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def is_sharded_checkpoint(directory: Path) -> bool:
    return (directory / METADATA).is_file()


# --- writing (now, or staged for the async checkpoint) ----------------------------------------

def write(state: Any, write_now: Callable[[Any, Any], None]) -> None:
    """``write_now(state, process_group)`` at once, or, while a save is being staged, on a copy
    of ``state`` in CPU memory, later."""
    writes = staging.pending()
    if writes is None:
        write_now(state, None)
        return
    staged = _stager().stage(state)  # the loop waits for this copy, not for the disk
    writes.append(lambda pg: write_now(staged, pg))


def save_sharded(directory: Path, model: nn.Module, optimizer: Any, extra: dict[str, Any]) -> None:
    """Every rank: model and optimizer shards (and ``extra``, plain values) in one ``dcp.save``."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, parts(optimizer))
    write({"model": model_state, "optimizer": optim_state, **extra}, lambda state, pg: _dcp_save(directory, state, pg))


def _dcp_save(directory: Path, state: dict[str, Any], pg: Any) -> None:
    import torch.distributed as td
    import torch.distributed.checkpoint as dcp

    metadata = dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory), single_file_per_rank=True),
                        process_group=pg)
    if not _distributed() or td.get_rank(pg) == 0:  # the coordinator, which wrote .metadata
        dcp_metadata.rewrite(directory, metadata)  # at the protocol a weights-only unpickler reads


def save_torch(obj: Any, path: Path) -> None:
    write(obj, lambda state, _pg: torch.save(state, path))


def save_safetensors(model: nn.Module, path: Path) -> None:
    """safetensors' ``save_model`` (tied weights stored once, under the name it picks)."""
    from safetensors.torch import save_model

    write(dict(model.state_dict()), lambda state, _pg: save_model(_StateOnly(state), str(path)))


class _StateOnly:
    """What ``save_model`` reads of a module (its state dict), for a staged copy."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)


_STAGER: Any = None


def _stager() -> Any:
    """One stager per process: it keeps its CPU buffers between saves (one save in flight at a
    time, so a buffer is never rewritten while its write runs)."""
    global _STAGER
    if _STAGER is None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        pinned = torch.cuda.is_available()
        _STAGER = DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False,
                                               use_async_staging=False, use_non_blocking_copy=False))
    return _STAGER


# --- reading ------------------------------------------------------------------------------

def load_sharded(directory: Path, model: nn.Module, optimizer: Any | None, extra: dict[str, Any]) -> dict[str, Any]:
    """A sharded checkpoint into any model (plain, DDP's module, FSDP), one process or many:
    DCP reads the pieces this rank's tensors need. ``extra``: placeholders of the plain values
    to read back; returns them filled. ``optimizer`` None: the weights only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
    )

    if optimizer is None:
        state = {"model": get_model_state_dict(model), **extra}
    else:
        model_state, optim_state = get_state_dict(model, parts(optimizer))
        state = {"model": model_state, "optimizer": optim_state, **extra}
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        _reader(directory).read_metadata()  # refused here, in one line, before DCP reads (and logs) anything
    except ConfigError as exc:
        raise ConfigError(f"checkpoint {directory}: {exc}") from None
    try:
        with warnings.catch_warnings():  # DCP warns that one process reads alone: that is the intent here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=_reader(directory), planner=_planner(), no_dist=not _distributed())
    except (Exception, CheckpointException) as exc:  # DCP wraps every rank's failure in one CheckpointException (a BaseException)
        raise ConfigError(f"checkpoint {directory} does not fit this model ({_first_line(exc)}); "
                          "was the model config changed?") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, parts(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return {key: state[key] for key in extra}


def load_full_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Full weights (a safetensors file's tensors) into a sharded model: every rank keeps its
    own piece of each full tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    result = set_model_state_dict(model, with_tied_names(model, weights), options=StateDictOptions(full_state_dict=True))
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys or result.unexpected_keys)[0]
        raise ConfigError(f"the checkpoint's weights do not match the model ({bad}, ...); was the model config changed?")


def load_full_optimizer(model: nn.Module, optimizer: Any, saved: dict[str, Any]) -> None:
    """A full ``optimizer.state_dict()`` into the optimizer of a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, parts(optimizer), by_name(model, optimizer, saved),
                             options=StateDictOptions(full_state_dict=True))


def with_tied_names(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with every name of a tied parameter filled (safetensors stores it once)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    out = dict(weights)
    for group in names.values():
        present = [n for n in group if n in weights]
        for name in group:
            if name not in out and present:
                out[name] = weights[present[0]]
    return out


def by_name(model: nn.Module, optimizer: Any, saved: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` (parameters numbered) keyed by parameter names instead, the
    form DCP's ``set_optimizer_state_dict`` takes; the saved groups match the live ones in order."""
    names = {id(p): n for n, p in model.named_parameters()}
    live_parts = parts(optimizer)
    saved_parts = [saved[key] for key in ("adamw", "muon")] if len(live_parts) > 1 else [saved]
    state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    for live, part in zip(live_parts, saved_parts):
        for live_group, group in zip(live.param_groups, part["param_groups"]):
            fqns = [names[id(p)] for p in live_group["params"]]
            state.update({fqn: part["state"][i] for i, fqn in zip(group["params"], fqns) if i in part["state"]})
            groups.append({**group, "params": fqns})
    return {"state": state, "param_groups": groups}


# --- reading a checkpoint that may come from anyone ------------------------------------------
# DCP reads ``.metadata`` with pickle.load and plain values with an unrestricted torch.load:
# either would run whatever a crafted checkpoint holds. These read the same data through torch's
# weights-only unpickler: the metadata's classes named exactly, then every field checked
# (``dcp_metadata``); plain values as tensors and plain values only.

def _reader(directory: Path) -> Any:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = dcp_metadata.read(Path(self.path))
            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(directory))


def _planner() -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import ReadItem

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            try:
                plain = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise ConfigError(f"refused {read_item.dest_index.fqn}: it holds more than tensors and plain values "
                                  f"({unpickling_reason(exc)})") from None
            super().load_bytes(read_item, _saved(plain))

    return Planner()


def _saved(value: Any) -> io.BytesIO:
    """``value`` as the bytes DefaultLoadPlanner reads back (it is plain by now)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def _distributed() -> bool:
    import torch.distributed as td

    return td.is_available() and td.is_initialized()



def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
