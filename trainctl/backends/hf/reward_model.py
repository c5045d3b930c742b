"""GRPO's reward-model built-in (``hf.grpo.rewards = ["model"]``, ``hf.grpo.reward_model = DIR``):
a sequence-classification checkpoint that scores each prompt + completion, handed to TRL's
``GRPOTrainer`` as a model in ``reward_funcs`` with its tokenizer in ``reward_processing_classes``,
so TRL's own scoring runs (the chat template for conversational prompts, right padding, the
logit of the last non-pad token, ``reward_weights``).

The folder may have been written by someone else, so nothing in it is trusted:

    check(path)   before the policy loads: a local folder (no hub id), config.json a regular file of
                  bounded size naming a transformers sequence-classification architecture with one
                  label (trust_remote_code stays off), safetensors weights (pickle weights only:
                  refused, never opened)
    load(path)    every top-level entry opened once, without following links and without blocking
                  (a symlink, FIFO or device is refused); transformers then reads those very files
                  through /proc/self/fd links in a private folder, so a file swapped after the
                  check is not what loads; safetensors only, local files only

``trainctl eval`` and the eval worker never call either (``BackendContext.trains``).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainctl.kernel.checkpoint_files import NotVerified, open_checkpoint, open_regular
from trainctl.kernel.errors import ConfigError

KEY = "hf.grpo.reward_model"
MAX_CONFIG_BYTES = 1 << 20
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # never linked into the folder transformers reads
FD_DIR = Path("/proc/self/fd")


@dataclass(frozen=True, kw_only=True, slots=True)
class Checked:
    """What ``check`` found: the folder and its config.json (a dict) and architecture."""

    path: Path
    config: dict[str, Any]
    architecture: str


def check(name: str) -> Checked:
    """The reward model folder ``name``, refused in one line when it cannot be one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as SEQ_CLS

    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(f"{KEY} {name}: no such folder; give a local save_pretrained folder of a sequence-classification "
                          "model (hub ids are not downloaded)")
    if not path.is_dir():
        raise ConfigError(f"{KEY} {name} is not a folder; give the save_pretrained folder of the reward model")
    config = _read_config(path)
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    scorers = [a for a in architectures if isinstance(a, str) and a.endswith("ForSequenceClassification")]
    if not isinstance(model_type, str) or model_type not in SEQ_CLS or not scorers:
        raise ConfigError(f"{KEY} {name} is a {'/'.join(map(str, architectures)) or model_type!r} checkpoint, not a "
                          "transformers sequence-classification model (its score head would be random, and remote code "
                          "is never run); give a ...ForSequenceClassification checkpoint with num_labels = 1")
    labels = config.get("num_labels") or len(config.get("id2label") or {0: ""})
    if labels != 1:
        raise ConfigError(f"{KEY} {name} has num_labels = {labels}; a reward model scores with one label "
                          "(num_labels = 1), as TRL loads it")
    files = os.listdir(path)
    if not any(f.endswith(".safetensors") for f in files):
        pickles = sorted(f for f in files if f.endswith(PICKLES))
        raise ConfigError(f"refused {KEY} {name}: no safetensors weights ({', '.join(pickles) or 'no weights at all'}); "
                          "pickle weights are never loaded: convert them to model.safetensors")
    return Checked(path=path, config=config, architecture=scorers[0])


def _read_config(path: Path) -> dict[str, Any]:
    dir_fd = _open_dir(path)
    try:
        fd, size = _open(dir_fd, "config.json", path)
        try:
            data = os.read(fd, MAX_CONFIG_BYTES + 1) if size <= MAX_CONFIG_BYTES else b""
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)
    try:
        config = json.loads(data)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise ConfigError(f"{KEY} {path}: config.json is not a JSON object of at most {MAX_CONFIG_BYTES} bytes")
    return config


def _open_dir(path: Path) -> int:
    try:
        return open_checkpoint(path)
    except NotVerified as exc:
        raise ConfigError(f"{KEY} {path}: {exc}") from None


def _open(dir_fd: int, name: str, path: Path) -> tuple[int, int]:
    try:
        return open_regular(dir_fd, name, missing=f"{name} is missing")
    except NotVerified as exc:
        raise ConfigError(f"refused {KEY} {path}: {str(exc).replace('a checkpoint', 'a reward model folder')}") from None


def load(checked: Checked, *, dtype: Any, device: Any) -> tuple[Any, Any]:
    """The reward model (eval mode, on ``device``) and its tokenizer, from the files of the folder
    opened here and only those (see the module's docstring)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainctl.kernel.safe_load import UNREADABLE_WEIGHTS, weights_refused

    if not FD_DIR.is_dir():
        raise ConfigError(f"{KEY}: loading a reward model safely needs /proc/self/fd (Linux)")
    path = checked.path
    dir_fd = _open_dir(path)
    opened: list[int] = []
    private = Path(tempfile.mkdtemp(prefix="trainctl-reward-model-"))  # 0700
    try:
        for name in sorted(os.listdir(dir_fd)):
            kind = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            if stat.S_ISDIR(kind) or name.endswith(PICKLES):
                continue  # transformers reads no subfolder here; pickles are never offered to it
            fd, _ = _open(dir_fd, name, path)  # a link, FIFO or device: refused, nothing blocks
            opened.append(fd)
            (private / name).symlink_to(FD_DIR / str(fd))  # this very file, whatever the folder holds later
        try:
            tokenizer = AutoTokenizer.from_pretrained(private, local_files_only=True, trust_remote_code=False)
            model = AutoModelForSequenceClassification.from_pretrained(
                private, num_labels=1, dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False)
        except UNREADABLE_WEIGHTS as exc:
            raise weights_refused(path, exc) from None
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"cannot load {KEY} {path}: {str(exc).splitlines()[0]}") from None
    finally:
        for fd in opened:
            os.close(fd)
        os.close(dir_fd)
        shutil.rmtree(private, ignore_errors=True)
    model.config._name_or_path = str(path)  # not the private folder's name
    return model.to(device).eval(), tokenizer
