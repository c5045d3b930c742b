"""The ``gpt`` backend: a nanoGPT-style GPT in plain PyTorch, implementing
:class:`trainctl.kernel.backend.Backend`. It owns the math of a step; the kernel owns the loop.

Batches are a pure function of (seed, step, micro-batch): resume and any number of ranks see
the same data, with no data position to save beyond the step itself.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from trainctl.backends.gpt import data as gpt_data
from trainctl.backends.gpt.inference import DATA_META, MODEL_ARGS, WEIGHTS, sample
from trainctl.backends.gpt.model import GPT, GPTConfig
from trainctl.backends.finite_update import FiniteUpdate
from trainctl.backends.gpt.optim import build_optimizer
from trainctl.backends.rng import load_rng, save_rng
from trainctl.kernel.safe_load import load_plain
from trainctl.kernel.backend import BackendContext, Plan, StepOutput
from trainctl.kernel.errors import ConfigError

OPTIMIZER = "optimizer.pt"

# Evaluation batches are fixed (the same at every evaluation, so losses compare); their key uses
# a "step" that training never reaches.
EVAL_KEYS = {"train": 2**32 - 1, "val": 2**32 - 2}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)  # one GPU per rank on a node
    if name != "auto":
        return torch.device(name)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, name)


class GPTBackend:
    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.cfg, self.train = ctx.model, ctx.train
        self.device = resolve_device(self.train.device, ctx.dist.local_rank)
        self.dtype = resolve_dtype(self.train.dtype, self.device)

    # --- setup ------------------------------------------------------------------------------

    def setup(self) -> Plan:
        ctx, train = self.ctx, self.train
        if train.threads:
            torch.set_num_threads(train.threads)
        self.data = gpt_data.load(ctx.data.path)
        self.tokenizer = gpt_data.Tokenizer(self.data.meta)
        block = self.cfg.block_size
        for split, arr in (("train", self.data.train), ("val", self.data.val)):
            if len(arr) <= block + 1:
                raise ConfigError(
                    f"model.block_size {block} is larger than the {split} data ({len(arr)} tokens); "
                    "lower model.block_size or use more data"
                )
        vocab = self.cfg.vocab_size or self.data.vocab_size
        if vocab < self.data.vocab_size:
            raise ConfigError(
                f"model.vocab_size {vocab} is smaller than the data's vocabulary ({self.data.vocab_size}); "
                "set model.vocab_size = 0 to take it from the data"
            )
        world = ctx.dist.world_size
        if train.grad_accum % world:
            raise ConfigError(f"train.grad_accum {train.grad_accum} must be a multiple of the {world} ranks")
        # micro-batches are numbered globally; this rank takes every world-th one
        self.micro = list(range(ctx.dist.rank, train.grad_accum, world))

        torch.manual_seed(ctx.seed)  # the same initial weights on every rank
        self.model_args = GPTConfig(
            block_size=block, vocab_size=vocab, n_layer=self.cfg.n_layer, n_head=self.cfg.n_head,
            n_embd=self.cfg.n_embd, dropout=self.cfg.dropout, bias=self.cfg.bias,
        )
        self.raw_model = GPT(self.model_args)
        if self.cfg.init_from not in ("", "scratch"):
            from trainctl.backends.gpt.nanogpt import init_weights

            self.init_note = init_weights(self.raw_model, self.cfg.init_from, self.model_args)
        self.raw_model.to(self.device)
        if ctx.dist.rank:
            torch.manual_seed(ctx.seed + ctx.dist.rank)  # other ranks draw other dropout masks; rank 0's stream is as alone
        # evaluation, measurement and generation never talk to the other ranks: the bare model
        self.eval_model = torch.compile(self.raw_model) if train.compile else self.raw_model
        self.model = self.eval_model
        self.ddp = None
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # averages gradients over ranks in backward (bucketed, overlapping the backward pass);
            # the GPT has no buffers, so its forward sends nothing
            ddp = DDP(self.raw_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.model = torch.compile(ddp) if train.compile else ddp
            self.ddp = ddp
        optim = ctx.optim
        self.optimizer = build_optimizer(
            self.raw_model, name=optim.name, lr=optim.lr, weight_decay=optim.weight_decay,
            betas=(optim.beta1, optim.beta2), eps=optim.eps, device_type=self.device.type,
            muon_lr=optim.muon_lr, muon_momentum=optim.muon_momentum, muon_weight_decay=0.0,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32 else contextlib.nullcontext()
        )
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.update = FiniteUpdate(self.optimizer)  # a non-finite step changes nothing, no host sync
        zero = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self.skipped_updates, self.skip_streak, self.skip_streak_max = zero(), zero(), zero()
        tokens_per_step = train.batch_size * train.grad_accum * block
        return Plan(
            params=sum(p.numel() for p in self.params),
            total_params=self.raw_model.num_params(non_embedding=False),
            tokens_per_step=tokens_per_step,
            flops_per_token=self.raw_model.flops_per_token(),
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            summary=(
                f"GPT {self.cfg.n_layer}x{self.cfg.n_embd} ({self.cfg.n_head} heads, block {block}, "
                f"vocab {vocab}) on {self.data.meta.get('source', ctx.data.path)}"
            ),
            details={"train_tokens": len(self.data.train), "val_tokens": len(self.data.val), "optimizer": optim.name}
            | ({"init_from": self.init_note} if getattr(self, "init_note", "") else {}),
        )

    # --- the step -----------------------------------------------------------------------------

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]

    def _batch(self, tokens: np.ndarray, *key: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.cfg.block_size
        starts = gpt_data.batch_starts(len(tokens), T, self.train.batch_size, *key)
        window = np.stack([tokens[s : s + T + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        xy = torch.from_numpy(window)
        if self.device.type == "cuda":
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]  # (B, T) inputs, (B, T) next-token targets

    def train_step(self, step: int) -> StepOutput:
        seed, loss_terms = self.ctx.seed, self.ctx.loss_terms
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        terms: dict[str, torch.Tensor] = {}
        for i, m in enumerate(self.micro):
            x, y = self._batch(self.data.train, seed, step, m)
            # DDP: gradients are all-reduced once, in the backward of the last local micro-batch.
            # Each rank divides by its own count and DDP averages over ranks, so the gradient
            # is the mean over all grad_accum micro-batches: N ranks x A = 1 process x N*A.
            last = i == len(self.micro) - 1
            with self._sync(last):
                with self.autocast:
                    logits, loss = self.model(x, y)  # (B, T, V), scalar
                    if loss_terms is not None:
                        base = loss
                        for name, term in loss_terms(logits, y, base):
                            loss = loss + term
                            terms[name] = terms.get(name, 0) + term.detach() / len(self.micro)
                self.scaler.scale(loss / len(self.micro)).backward()
            total += loss.detach()
        loss = total / len(self.micro)
        self.scaler.unscale_(self.optimizer)  # no-op unless float16
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)  # also decides finiteness
        if self.train.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.train.grad_clip, grad_norm, foreach=True)
        # bool, on the device. Distributed: decided from the all-reduced gradients alone, which
        # every rank shares (a non-finite loss on any rank makes them non-finite), so all agree
        finite = torch.isfinite(grad_norm) if self.ddp is not None else torch.isfinite(loss) & torch.isfinite(grad_norm)
        skip = ~finite
        self._update(skip)
        # device-side counters for the loss guard, read with the loss on logged steps
        self.skip_streak.add_(1).mul_(skip)
        torch.maximum(self.skip_streak_max, self.skip_streak, out=self.skip_streak_max)
        self.skipped_updates.add_(skip)
        terms["skipped_updates"] = self.skipped_updates
        terms["skip_streak_max"] = self.skip_streak_max
        tokens = self.train.batch_size * self.train.grad_accum * self.cfg.block_size
        return StepOutput(loss=loss, grad_norm=grad_norm, tokens=tokens, metrics=terms, skipped=skip)

    def _sync(self, last: bool):
        """Under DDP, hold the gradient all-reduce back for all but the last local micro-batch."""
        return contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()

    def _update(self, skip: torch.Tensor) -> None:
        """Apply the optimizer step unless ``skip``; parameters and optimizer state stay
        bit-identical when skipped."""
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # float16: the scaler skips non-finite gradients itself
            self.scaler.update()
        else:
            self.update.step(~skip)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        self.model.eval()
        losses = {}
        for split, arr in (("train", self.data.train), ("val", self.data.val)):
            total = torch.zeros((), device=self.device)
            for k in range(self.train.eval_steps):
                x, y = self._batch(arr, self.ctx.seed, EVAL_KEYS[split], k)
                with self.autocast:
                    total += self.eval_model(x, y)[1].float()  # every rank: the same batches, the same loss
            losses[split] = (total / self.train.eval_steps).item()
        self.model.train()
        return losses

    # --- state ------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Every rank writes its RNG; rank 0 the rest (weights and optimizer are the same on every
        rank under DDP)."""
        save_rng(directory, self.ctx.dist.rank, self.device)
        if self.ctx.dist.rank != 0:
            return
        save_model(self.raw_model, str(directory / WEIGHTS))  # tied weights stored once
        torch.save({"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}, directory / OPTIMIZER)
        (directory / MODEL_ARGS).write_text(json.dumps(asdict(self.model_args), indent=1))
        (directory / DATA_META).write_text(json.dumps(self.data.meta, indent=1))

    def load(self, directory: Path) -> None:
        load_model(self.raw_model, str(directory / WEIGHTS), device=str(self.device))
        opt = load_plain(directory / OPTIMIZER, self.device)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scaler.load_state_dict(opt["scaler"])
        load_rng(directory, self.ctx.dist.rank, self.device, self.ctx.seed)

    # --- inference ------------------------------------------------------------------------------

    def generate(self, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 200, seed: int = 0) -> str:
        was_training = self.raw_model.training
        self.raw_model.eval()
        with self.autocast:
            text = sample(self.raw_model, self.tokenizer, prompt, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, seed=seed, device=str(self.device))
        self.raw_model.train(was_training)
        return text

    @torch.no_grad()
    def layer_stats(self) -> dict[str, float]:
        """Weight and gradient norms per block (``layer.N``), for the embeddings (``embedding``:
        wte, tied with the head, and wpe) and the rest (``head``: the final LayerNorm). The
        gradients are those of the last step: ``zero_grad`` runs at the start of the next one."""
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in self.raw_model.named_parameters():  # a tied weight is listed once
            parts = name.split(".")
            if parts[:2] == ["transformer", "h"]:
                group = f"layer.{parts[2]}"
            elif parts[:2] in (["transformer", "wte"], ["transformer", "wpe"]):
                group = "embedding"
            else:
                group = "head"
            groups.setdefault(group, []).append(p)
        names, norms = [], []
        for group, params in groups.items():
            names.append(f"{group}.weight_norm")
            norms.append(torch.linalg.vector_norm(torch.stack([p.float().norm() for p in params])))
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                names.append(f"{group}.grad_norm")
                norms.append(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])))
        values = torch.stack(norms).tolist()  # host sync: once, on the steps that asked
        return dict(zip(names, values))

    def measure(self, steps: int = 2) -> float:
        """Seconds per optimizer step from forward/backward alone; weights, optimizer and RNG
        are untouched."""
        rng = torch.get_rng_state()
        x, y = self._batch(self.data.train, self.ctx.seed, 0, 0)
        started = time.perf_counter()
        for _ in range(steps):
            with self.autocast:
                loss = self.eval_model(x, y)[1]
            loss.backward()  # the bare model: no all-reduce, so the estimate leaves it out
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        return (time.perf_counter() - started) / steps * self.train.grad_accum / self.ctx.dist.world_size

    def close(self) -> None:
        # DDP's reducer must go before the process group does, or its C++ threads may abort the
        # process at exit
        self.model = self.eval_model
        self.ddp = None
