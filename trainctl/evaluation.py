"""Evaluating a checkpoint: the one function behind ``trainctl eval`` and ``trainctl eval-worker``.

The run's backend is rebuilt from the checkpoint's own ``config.toml`` (the fully resolved config
the run trained with) through the generic :class:`~trainctl.kernel.backend.Backend` protocol, so
it works for any backend: ``setup()``, ``load(checkpoint)``, ``evaluate(step)``. Evaluation
batches are fixed, so on the same device a remote evaluation equals a local ``trainctl eval`` of
the same checkpoint, bit for bit. Perplexity is ``exp(loss)``.

Nothing is ever written into the training run: the backend gets a scratch ``out_dir``. Nothing
is read from it after verification either: the checkpoint's files are copied into the scratch
directory as they are hashed (:func:`~trainctl.kernel.checkpoint_files.snapshot`), and the backend
loads that copy, so a checkpoint changed or swapped for a link meanwhile cannot change what is
evaluated. The eval worker adds a :class:`~trainctl.remote.policy.Policy` that confines the paths
the checkpoint's config names and bounds the work it asks for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainctl.kernel.backend import Evaluation
from trainctl.kernel.errors import ConfigError

MAX_PROMPTS = 16
MAX_NEW_TOKENS = 1024
#: What ``load`` reads beyond the kernel's files, per built-in backend: a checkpoint evaluated
#: must list them (any backend: weights in at least one ``.safetensors`` file, or a sharded
#: checkpoint's ``.metadata`` and ``.distcp`` shards, which hold the optimizer state too).
EXPECTED = {"gpt": ("model.safetensors", "optimizer.pt"), "hf": ("optimizer.pt", "trainer_state.json")}
EXPECTED_SHARDED = {"gpt": ("model.json",), "hf": ("trainer_state.json",)}


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleRequest:
    """Generations from fixed prompts (seeded, so the same checkpoint gives the same text)."""

    prompts: tuple[str, ...]
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int | None = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= len(self.prompts) <= MAX_PROMPTS:
            raise ValueError(f"samples.prompts must hold 1 to {MAX_PROMPTS} prompts")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"samples.max_new_tokens must be in 1..{MAX_NEW_TOKENS}")
        if self.temperature <= 0:
            raise ValueError("samples.temperature must be positive")


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalResult:
    checkpoint: str
    step: int
    backend: str
    val_loss: float | None = None
    train_loss: float | None = None
    perplexity: float | None = None  # exp(val_loss), when that loss is a cross-entropy
    train_perplexity: float | None = None
    accuracy: float | None = None  # val: top-1 token accuracy (DPO: reward accuracy)
    train_accuracy: float | None = None
    loss_mean: str = "tokens"  # which mean the losses are (the run's train.eval_loss): tokens | batches
    samples: list[dict[str, str]] = field(default_factory=list)  # [{"prompt", "text"}]
    device: str = ""
    duration: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def find_checkpoint(path: Path) -> Path:
    """A verified checkpoint directory, or a run directory's newest verified checkpoint."""
    from trainctl.kernel.checkpoint_files import MANIFEST, checkpoints, verify

    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; give a run directory or a checkpoint directory")
    if (path / MANIFEST).exists():
        problem = verify(path)
        if problem:
            raise ConfigError(f"checkpoint {path} does not verify: {problem}; evaluate another checkpoint")
        return path
    candidates = list(reversed(checkpoints(path / "checkpoints")))
    chosen = next((c for c in candidates if verify(c) is None), None)
    if chosen is None:
        raise ConfigError(f"no verified checkpoint in {path}; give a checkpoint directory or train first")
    return chosen


class Evaluator:
    """Builds backends from checkpoints and evaluates them. The last backend is kept and reused
    when the next checkpoint has the same config (the usual case: every checkpoint of a run),
    since ``load`` restores all of its state."""

    def __init__(self, *, work_dir: Path, device: str | None = None, registry: Any = None,
                 load_only: bool = False) -> None:
        """``load_only``: backends built to load and save or generate only (``BackendContext.load_only``:
        no data check); such an evaluator must not ``evaluate``."""
        self.work_dir, self.load_only = work_dir, load_only
        self.device = device
        self._registry = registry
        self._cached: tuple[str, Any, Any] | None = None  # (config key, RunConfig, backend)

    def evaluate(self, checkpoint: Path, *, dir_fd: int | None = None, step: int | None = None,
                 val_loss: bool = True, samples: SampleRequest | None = None, policy: Any = None) -> EvalResult:
        """Verify and evaluate the checkpoint (open as ``dir_fd`` if given); ``step``: the step it
        must be. ConfigError if it does not verify or ``policy`` refuses its config."""
        started = time.perf_counter()
        with self.loaded(checkpoint, dir_fd=dir_fd, step=step, policy=policy) as (manifest, config, backend, _):
            results = {split: Evaluation.of(r) for split, r in backend.evaluate(manifest["step"]).items()} if val_loss else {}
            losses = {split: r.loss for split, r in results.items()}
            texts = []
            if samples is not None:
                for prompt in samples.prompts:
                    text = backend.generate(prompt, max_new_tokens=samples.max_new_tokens,
                                            temperature=samples.temperature, top_k=samples.top_k, seed=samples.seed)
                    texts.append({"prompt": prompt, "text": text})
        val, train = losses.get("val"), losses.get("train")
        return EvalResult(
            checkpoint=str(checkpoint), step=manifest["step"], backend=config.backend,
            val_loss=val, train_loss=train,
            perplexity=results["val"].perplexity if "val" in results else None,
            train_perplexity=results["train"].perplexity if "train" in results else None,
            accuracy=results["val"].accuracy if "val" in results else None,
            train_accuracy=results["train"].accuracy if "train" in results else None,
            loss_mean=next((r.loss_mean for r in results.values()), "tokens"),
            samples=texts, device=config.train.device, duration=time.perf_counter() - started,
        )

    @contextmanager
    def loaded(self, checkpoint: Path, *, dir_fd: int | None = None, step: int | None = None,
               policy: Any = None) -> Iterator[tuple[dict, Any, Any, Path]]:
        """(manifest, config, backend, verified copy): the checkpoint verified into a private copy
        and loaded into its backend, in this one process (a sharded checkpoint is read whole)."""
        from trainctl.kernel.checkpoint_files import (
            NotVerified, holds_weights, is_sharded, named_as, open_checkpoint, snapshot,
        )

        copy = self.work_dir / "checkpoint"
        shutil.rmtree(copy, ignore_errors=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        fd = dir_fd
        try:
            if fd is None:
                fd = open_checkpoint(checkpoint)
            manifest = snapshot(fd, copy, max_bytes=getattr(policy, "max_bytes", None))
        except NotVerified as exc:
            raise ConfigError(f"checkpoint {checkpoint} does not verify: {exc}") from None
        finally:
            if fd is not None and dir_fd is None:
                os.close(fd)
        try:
            if step is not None and manifest["step"] != step:
                raise ConfigError(f"checkpoint {checkpoint} is step {manifest['step']}, the job says step {step}")
            with named_as(copy, checkpoint):
                config, backend = self._backend(copy, policy)
                files = manifest["files"]
                expected = (EXPECTED_SHARDED if is_sharded(files) else EXPECTED).get(config.backend, ())
                missing = [n for n in expected if n not in files]
                if missing or not holds_weights(files):
                    what = ", ".join(missing) or "any .safetensors weights"
                    raise ConfigError(f"checkpoint {checkpoint} does not verify: the manifest does not list {what}")
                backend.load(copy)
            yield manifest, config, backend, copy
        finally:
            shutil.rmtree(copy, ignore_errors=True)

    def close(self) -> None:
        if self._cached is not None:
            self._cached[2].close()
            self._cached = None

    def _backend(self, checkpoint: Path, policy: Any) -> tuple[Any, Any]:
        from trainctl.kernel import config as cfg
        from trainctl.kernel.backend import BackendContext
        from trainctl.kernel.registry import Registry, load_factory
        from trainctl.kernel.run import CONFIG_FILE

        raw = cfg.read_toml(checkpoint / CONFIG_FILE)
        # Plugins play no part in an evaluation (and may not be installed here): drop them.
        raw.pop("plugin", None)
        raw["plugins"] = []
        if policy is not None:
            policy.check_config(raw)
        train = raw.setdefault("train", {})
        train.update(out_dir=str(self.work_dir), compile=False)
        if "parallel" in train:  # one process, whatever the run's strategy: DCP reads shards into full tensors
            train["parallel"] = "ddp"
        if self.device:
            train["device"] = self.device
        key = json.dumps(raw, sort_keys=True, default=str)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1], self._cached[2]
        self.close()
        if self._registry is None:
            self._registry = Registry.discover()
        config = cfg.resolve(raw, self._registry)
        spec = self._registry.backend(config.backend)
        try:
            factory = load_factory(spec.factory)
        except ImportError as exc:
            extra = f": pip install 'trainctl[{spec.extra}]'" if spec.extra else ""
            raise ConfigError(f"backend '{config.backend}' needs a package that is missing ({exc.name}){extra}") from None
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # trains=False: no reward (or other training-only code) that the checkpoint's config names is imported
        backend = factory(BackendContext.of(config, out_dir=self.work_dir, load_only=self.load_only, trains=False))
        backend.setup()
        self._cached = (key, config, backend)
        return config, backend
