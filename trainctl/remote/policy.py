"""What the eval worker grants a job: its limits, and the check of the config a checkpoint
carries. The config comes from whoever wrote the checkpoint, so before a backend is built from
it every path it names must lie under the worker's roots (rewritten to its real path, so what
was checked is what the backend opens) and the work it asks for must fit the limits.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainctl.kernel.errors import ConfigError
from trainctl.kernel.schema import TrainConfig
from trainctl.remote.roots import Roots


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    job_timeout_s: float = 900.0  # one evaluation, wall clock; then its process is killed
    max_attempts: int = 3  # evaluations of one job that died (or whose worker died) before it is an error
    max_eval_steps: int = 1000  # train.eval_steps a checkpoint's config may ask for
    max_batch_size: int = 1024  # train.batch_size likewise
    max_checkpoint_gb: float = 200.0  # bytes copied per evaluation (the checkpoint is snapshotted)
    max_queue: int = 1000  # queued jobs; more are answered 429
    keep_finished: int = 1000  # finished jobs kept (the oldest go first) ...
    keep_days: float = 30.0  # ... and none longer than this
    request_timeout_s: float = 10.0  # to send a request's headers, and again its body
    max_connections: int = 64  # open connections; the oldest one still without a request goes first

    def __post_init__(self) -> None:
        positive = ("job_timeout_s", "max_attempts", "max_eval_steps", "max_batch_size", "max_checkpoint_gb",
                    "max_queue", "keep_finished", "keep_days", "request_timeout_s", "max_connections")
        bad = [name for name in positive if not getattr(self, name) > 0]
        if bad:
            raise ConfigError(f"eval-worker: {bad[0].replace('_', '-')} must be positive")


#: What an absent ``[train]`` key means: the schema's default.
TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

#: The config keys that name files or directories, per backend, with the values that do not.
PATH_KEYS: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    "gpt": (("data", "path", ("",)), ("model", "init_from", ("", "scratch"))),
    "hf": (("model", "name_or_path", ("",)), ("model", "tokenizer", ("",)), ("model", "chat_template", ("",)),
           ("data", "train", ("",)), ("data", "val", ("",)), ("hf.dpo", "ref_model", ("",))),
}


class Policy:
    def __init__(self, roots: Roots, limits: Limits) -> None:
        self.roots, self.limits = roots, limits
        self.max_bytes = int(limits.max_checkpoint_gb * 2**30)

    def check_config(self, raw: dict[str, Any]) -> None:
        """Refuse (ConfigError) or confine, in place, the raw config of a checkpoint."""
        backend = raw.get("backend", "gpt")
        if backend not in PATH_KEYS:
            raise ConfigError(f"backend {backend!r}: the eval worker knows which config keys name files only for "
                              f"{', '.join(PATH_KEYS)}, so it evaluates only those")
        train = raw.get("train", {})
        for key, limit, flag in (("eval_steps", self.limits.max_eval_steps, "eval-steps"),
                                 ("batch_size", self.limits.max_batch_size, "batch-size"),
                                 ("eval_batch_size", self.limits.max_batch_size, "batch-size")):
            value = train.get(key, TRAIN_DEFAULTS[key])
            if not isinstance(value, int) or value > limit or (key == "eval_steps" and value == 0):  # 0: a whole split
                raise ConfigError(f"the checkpoint's config asks for train.{key} = {value!r}, over the worker's "
                                  f"limit of {limit} (--max-{flag})")
        data = raw.get("data", {})
        for key in ("data_files", "val_files"):
            if isinstance(data, dict) and data.get(key):  # globs, resolved by datasets: no one path to confine
                raise ConfigError(f"the checkpoint's config names data.{key}, which the eval worker does not read "
                                  "(a pattern of files cannot be confined to its roots); name the data by its path "
                                  "in data.train / data.val, or evaluate the checkpoint locally (trainctl eval)")
        if backend == "gpt":
            self._confine_sources(data)
        for section, key, plain in PATH_KEYS[backend]:
            table = raw
            for part in section.split("."):  # e.g. hf.dpo
                table = table.get(part) if isinstance(table, dict) else None
                table = table if isinstance(table, dict) else {}
            value = table.get(key)
            if value is None or value in plain or (key == "chat_template" and "{" in value):
                continue  # a default, or template text rather than a file
            table[key] = str(self.confine(f"{section}.{key}", value, directory=key in ("name_or_path", "tokenizer", "ref_model")))
            if key in ("name_or_path", "ref_model"):
                self._adapter_base(f"{section}.{key}", Path(table[key]))

    def _confine_sources(self, data: Any) -> None:
        """A gpt mixture names a directory per source (``[[data.sources]]``): each is confined."""
        sources = data.get("sources") if isinstance(data, dict) else None
        if sources is None:
            return
        if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
            raise ConfigError("the checkpoint's config has a data.sources that is not a list of tables")
        for i, source in enumerate(sources):
            if source.get("path"):  # an empty one the config refuses itself
                source["path"] = str(self.confine(f"data.sources[{i}].path", source["path"], directory=False))

    def _adapter_base(self, name: str, directory: Path) -> None:
        """A LoRA adapter directory names its base model in ``adapter_config.json``, which
        transformers then loads as written: that path must lie under a root too."""
        config = directory / "adapter_config.json"
        if not config.is_file():
            return
        try:
            with open(config, "rb") as f:
                base = json.loads(f.read(1 << 20)).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            raise ConfigError(f"the checkpoint's config has {name} = {str(directory)!r}, whose adapter_config.json "
                              "is unreadable") from None
        if base:
            self.confine(f"the base model of {name}'s adapter", base, directory=True)

    def confine(self, name: str, value: Any, *, directory: bool) -> Path:
        if not isinstance(value, str) or "\0" in value:
            raise ConfigError(f"the checkpoint's config has {name} = {value!r}, which is not a path")
        real = Path(os.path.realpath(os.path.expanduser(value)))
        if not self.roots.contains(real):
            raise ConfigError(f"the checkpoint's config names {name} = {value!r}, which is outside the worker's roots "
                              f"({self.roots}); put it under a root or evaluate the checkpoint locally (trainctl eval)")
        if directory and not real.is_dir():  # a hub id: the worker downloads nothing
            raise ConfigError(f"the checkpoint's config names {name} = {value!r}, which is not a directory under the "
                              "worker's roots; the eval worker loads models only from local directories")
        return real
