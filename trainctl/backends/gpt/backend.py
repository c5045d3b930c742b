"""The ``gpt`` backend: a nanoGPT-style GPT in plain PyTorch, implementing
:class:`trainctl.kernel.backend.Backend` on the shared step machinery
(``trainctl.backends.step``): it owns the model, the data and the loss; the kernel owns the loop.

Batches are a pure function of (seed, step, micro-batch), over one dataset or a weighted
mixture (``mixture.py``): resume and any number of ranks see the same data, with no data
position to save beyond the step itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from trainctl.backends import parallel, scoring, sharded_checkpoint
from trainctl.backends.device import set_threads
from trainctl.backends.gpt import data as gpt_data
from trainctl.backends.gpt import mixture
from trainctl.backends.gpt.inference import DATA_META, MODEL_ARGS, WEIGHTS, sample
from trainctl.backends.gpt.model import GPT, GPTConfig
from trainctl.backends.layer_stats import group_norms
from trainctl.backends.optim import from_config
from trainctl.backends.sample_record import SampleRecord
from trainctl.backends.step import MicroLoss, OptimizerStep, StepBackend, local_micro_batches
from trainctl.kernel.backend import Evaluation, Plan, StepOutput
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.safe_load import load_safetensors, load_safetensors_into

# Evaluation batches are fixed (the same at every evaluation, so losses compare); their key uses
# a "step" that training never reaches.
EVAL_KEYS = {"train": 2**32 - 1, "val": 2**32 - 2}
TIED = "transformer.wte.weight"  # = lm_head.weight, the name safetensors' save_model keeps


class GPTBackend(StepBackend):
    # --- setup ------------------------------------------------------------------------------

    def setup(self) -> Plan:
        ctx, train = self.ctx, self.train
        self.cfg = ctx.model
        set_threads(train.threads)
        if train.eval_steps == 0:  # a token stream has no "whole split" of batches
            raise ConfigError("train.eval_steps = 0 (the whole split) is for the hf backend; the gpt backend samples "
                              "batches: set train.eval_steps to 1 or more")
        self.data = mixture.load(ctx.data, ctx.seed)
        self.tokenizer = gpt_data.Tokenizer(self.data.meta)
        block = self.cfg.block_size
        for split, lengths in self.data.lengths.items():
            for name, n in zip(self.data.names, lengths.tolist()):
                if n <= block + 1:
                    of = f"{split} data of {name}" if ctx.data.sources else f"{split} data"
                    raise ConfigError(
                        f"model.block_size {block} is larger than the {of} ({n} tokens); "
                        "lower model.block_size or use more data"
                    )
        vocab = self.cfg.vocab_size or self.data.vocab_size
        if vocab < self.data.vocab_size:
            raise ConfigError(
                f"model.vocab_size {vocab} is smaller than the data's vocabulary ({self.data.vocab_size}); "
                "set model.vocab_size = 0 to take it from the data"
            )
        self.micro = local_micro_batches(train.grad_accum, ctx.dist)
        self.record = SampleRecord(ctx.out_dir, rank=ctx.dist.rank, world_size=ctx.dist.world_size) if ctx.data.record_samples else None

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
        self.raw_model.activation_checkpointing = train.activation_checkpointing
        # the GPT has no buffers, so DDP's forward sends nothing; FSDP shards block by block
        placed = parallel.for_run(self.raw_model, device=self.device, world_size=ctx.dist.world_size,
                                  sharding=parallel.Sharding.of(train), blocks=self.raw_model.transformer.h, dtype=self.dtype)
        self.eval_model = placed.model  # evaluation, measurement, generation (DDP: never talks to other ranks)
        self.optimizer = from_config(self.raw_model, ctx.optim, self.device.type)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.stepper = OptimizerStep(optimizer=self.optimizer, params=self.params, placement=self.placement,
                                     parallel=placed, train=train, dist=ctx.dist, seed=ctx.seed, loss_terms=ctx.loss_terms)
        device, dtype = self.placement.names
        return Plan(
            params=sum(p.numel() for p in self.params),
            total_params=self.raw_model.num_params(non_embedding=False),
            tokens_per_step=train.batch_size * train.grad_accum * block,
            flops_per_token=self.raw_model.flops_per_token(),
            device=device, dtype=dtype,
            summary=(
                f"GPT {self.cfg.n_layer}x{self.cfg.n_embd} ({self.cfg.n_head} heads, block {block}, "
                f"vocab {vocab}) on {self.data.meta.get('source', ctx.data.path)}"
            ),
            details={"train_tokens": int(self.data.lengths["train"].sum()), "val_tokens": int(self.data.lengths["val"].sum()),
                     "optimizer": ctx.optim.name, "parallel": parallel.describe(train, ctx.dist.world_size, self.dtype)}
            | ({"init_from": self.init_note} if getattr(self, "init_note", "") else {}),
        )

    # --- the step: batches and loss; the rest is OptimizerStep's --------------------------------

    def _draw(self, split: str, step: int, micro: int, source: int | None = None) -> mixture.Draw:
        return self.data.draw(split, self.cfg.block_size, self.train.batch_size, self.ctx.seed, step, micro,
                              self.train.grad_accum, source=source)

    def _batch(self, split: str, draw: mixture.Draw) -> tuple[torch.Tensor, torch.Tensor]:
        xy = torch.from_numpy(self.data.windows(split, draw, self.cfg.block_size))  # (B, T+1)
        if self.device.type == "cuda":
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]  # (B, T) inputs, (B, T) next-token targets

    def _loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], with_logits: bool) -> MicroLoss:
        """Mean cross-entropy of the micro-batch; its share of the step is 1/grad_accum."""
        x, y = batch
        logits, loss = model(x, y)  # (B, T, V), scalar
        if not with_logits:
            return MicroLoss(share=loss / self.train.grad_accum)
        return MicroLoss(share=loss / self.train.grad_accum, ce=loss, logits=logits, targets=y)

    def train_step(self, step: int) -> StepOutput:
        draws = [self._draw("train", step, m) for m in self.micro]
        if self.record is not None:  # ids known on the host: no device work
            rows = mixture.Draw.joined(draws)
            self.record.write(step + 1, {"index": rows.index.tolist(), "source": [self.data.names[k] for k in rows.source.tolist()],
                                         "offset": rows.start.tolist()})
        batches = [self._batch("train", d) for d in draws]
        return self.stepper.run(batches, self._loss, tokens=self.train.batch_size * self.train.grad_accum * self.cfg.block_size)

    def evaluate(self, step: int) -> dict[str, Evaluation]:
        """Fixed batches (the same at every evaluation); every rank scores the same ones. Every
        batch scores B * T targets, so ``train.eval_loss = "batches"`` gives the token mean too."""
        def score(batch: tuple[torch.Tensor, torch.Tensor]) -> scoring.BatchScore:
            logits, loss = self.eval_model(*batch)  # (B, T, V), mean over every target (none ignored)
            y = batch[1]
            predictions = (logits, y) if self.ctx.eval_metrics else (None, None)  # for plugins' metrics only
            return scoring.BatchScore(loss.float() * y.numel(), (logits.argmax(-1) == y).sum(), y.numel(), y.size(0),
                                      *predictions)

        splits = {split: self._eval_batches(split) for split in ("train", "val")}
        if len(self.data.sources) > 1:  # each source's own val as well: which domain the model learns
            splits |= {f"val.{name}": self._eval_batches("val", k) for k, name in enumerate(self.data.names)}
        return scoring.evaluate(self.raw_model, splits, score, self.stepper.autocast, self.device, mean=self.train.eval_loss,
                                metrics=self.ctx.eval_metrics)

    def _eval_batches(self, split: str, source: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self._batch(split, self._draw(split, EVAL_KEYS[split], k, source)) for k in range(self.train.eval_steps))

    # --- state ------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Every rank writes its RNG (and under FSDP its shard of the weights and optimizer);
        rank 0 the rest (full weights and optimizer are the same on every rank under DDP)."""
        if self.stepper.save(directory, self.raw_model):
            sharded_checkpoint.save_safetensors(self.raw_model, directory / WEIGHTS)  # tied weights stored once
        if self.ctx.dist.rank == 0:
            (directory / MODEL_ARGS).write_text(json.dumps(asdict(self.model_args), indent=1))
            (directory / DATA_META).write_text(json.dumps(self.data.meta, indent=1))

    def load(self, directory: Path) -> None:
        if not sharded_checkpoint.is_sharded_checkpoint(directory):  # sharded: the stepper reads the weights too
            if sharded_checkpoint.is_sharded(self.raw_model):
                sharded_checkpoint.load_full_weights(self.raw_model, load_safetensors(directory / WEIGHTS))
            else:
                load_safetensors_into(self.raw_model, directory / WEIGHTS, self.device)
        self.stepper.load(directory, self.raw_model)

    # --- inference ------------------------------------------------------------------------------

    def generate(self, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 200, seed: int = 0) -> str:
        was_training = self.raw_model.training
        self.raw_model.eval()
        with self.stepper.autocast:
            text = sample(self.raw_model, self.tokenizer, prompt, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, seed=seed, device=str(self.device))
        self.raw_model.train(was_training)
        return text

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
        return group_norms(groups)

    def measure(self, steps: int = 2) -> float:
        """Seconds per optimizer step from forward/backward alone; weights, optimizer and RNG
        are untouched."""
        batch = self._batch("train", self._draw("train", 0, 0))
        return self.stepper.measure(batch, self._loss, steps=steps, micro_batches=len(self.micro))

