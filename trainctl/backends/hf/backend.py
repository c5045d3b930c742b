"""The ``hf`` backend: a Hugging Face causal LM fine-tuned with TRL's SFT data pipeline and loss,
implementing :class:`trainctl.kernel.backend.Backend`. The kernel owns the loop.

Design: our loop, TRL as a library, not a callback bridge around ``SFTTrainer.train()``.
The kernel already owns steps, the learning rate, evaluation cadence, checkpoints and
stop/pause/save decisions. Driving ``trainer.train()`` through a ``TrainerCallback`` would turn
those decisions back into flags inside HF's loop (``control.should_save`` ...), make the loss
visible only in ``on_log`` (a host sync every step), need a ``LambdaLR`` to carry the kernel's
learning rate, make pause a blocking callback or a full HF checkpoint and restart, and leave
epochs, data skipping on resume and the checkpoint layout to HF. Instead ``SFTTrainer`` is built
once and used for what is TRL's: preparing the rows (chat template, assistant/completion masks,
truncation, BFD/wrapped packing), its collator, and its fused LM head. Each micro-batch's loss
is exactly ``SFTTrainer.compute_loss``'s: ``-sum(log_probs) / num_items_in_batch`` over the
fused head, with ``num_items_in_batch`` the trained-token count of the whole step (so gradient
accumulation is token-exact). Per-step losses match ``trainer.train()`` (bench/hf_vs_trl.py).
``compute_loss`` itself is not called because it reads three metrics to the host on every
micro-batch; its ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` come back under TRL's
names as device tensors, read on logged steps only. Evaluation scores each batch as
``compute_loss`` does in eval mode (the fused head's token mean over the batch) and reports the
token mean or, with ``train.eval_loss = "batches"``, ``Trainer.evaluate()``'s ``eval_loss``.
Everything else in a step (accumulation under DDP, autocast, clipping, the on-device skip of
non-finite updates) is the shared ``trainctl.backends.step``'s, as for every backend.

Batches are a pure function of (seed, step, micro-batch) (see ``sft.py``), and the trained-token
count of a step is read from the collated labels on the host before they move to the device.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import transformers  # noqa: F401  (imported here so a missing extra is the kernel's one-line hint)
import trl  # noqa: F401

from trainctl.backends import parallel, scoring
from trainctl.backends.device import set_threads
from trainctl.backends.hf import epochs, inference, loading, neftune, plan, rows, sft, stream, weights
from trainctl.backends.hf.config import DataConfig, HFConfig, ModelConfig
from trainctl.backends.hf.num_tokens import InputTokens
from trainctl.backends.hf.validate import check_rows
from trainctl.backends.optim import from_config
from trainctl.backends.sample_record import SampleRecord
from trainctl.backends.step import MicroLoss, OptimizerStep, StepBackend, local_micro_batches
from trainctl.kernel.backend import BackendContext, Evaluation, Plan, StepOutput
from trainctl.kernel.errors import ConfigError

PLAN_SAMPLE_STEPS = 8  # steps collated (host only) to estimate tokens per step
EVAL_EPOCH = 2**32 - 1  # the seeded order evaluation samples training rows from: never a training epoch


def resolve_mask(shape: str, mask: str) -> str:
    """The mask ``data.mask`` means for rows of ``shape``: ``auto`` trainctl's choice, ``trl``
    ``SFTConfig``'s defaults (``assistant_only_loss=False``, ``completion_only_loss=None``: every
    token of a conversation, the completion of a prompt/completion row)."""
    if mask == "auto":
        return {"messages": "assistant_only", "prompt_completion": "completion_only"}.get(shape, "none")
    if mask == "trl":
        return "completion_only" if shape == "prompt_completion" else "none"
    if mask == "assistant_only" and shape == "text":
        raise ConfigError("data.mask = assistant_only needs conversations (messages or prompt/completion lists); this data is plain text")
    if mask == "completion_only" and shape != "prompt_completion":
        raise ConfigError(f"data.mask = completion_only needs prompt/completion rows; this data is {shape}")
    return mask


def decoder_layers(model: Any, base: Any) -> list[Any]:
    """FSDP's units of ``model``: its decoder layers (the classes ``base`` says must not be split),
    bottom-up, as ``fully_shard`` needs them; the root follows."""
    no_split = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in no_split][::-1]


class HFBackend(StepBackend):
    def __new__(cls, ctx: BackendContext) -> HFBackend:
        """``[hf] objective = "dpo"`` builds the preference backend (``dpo_backend.py``) instead,
        ``"grpo"`` the online RL one (``grpo_backend.py``)."""
        hf = ctx.sections.get("hf")
        if cls is HFBackend and hf is not None and hf.objective == "dpo":
            from trainctl.backends.hf.dpo_backend import DPOBackend

            return super().__new__(DPOBackend)
        if cls is HFBackend and hf is not None and hf.objective == "grpo":
            from trainctl.backends.hf.grpo_backend import GRPOBackend

            return super().__new__(GRPOBackend)
        return super().__new__(cls)

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.cfg: ModelConfig = ctx.model
        self.data_cfg: DataConfig = ctx.data
        self.hf: HFConfig = ctx.sections.get("hf") or HFConfig()

    # --- setup ------------------------------------------------------------------------------

    def setup(self) -> Plan:
        ctx, data, train = self.ctx, self.data_cfg, self.train
        set_threads(train.threads)
        if train.compile:
            raise ConfigError("train.compile is not supported by the hf backend (TRL's fused loss head is patched in at run time); set it to false")
        self.micro = local_micro_batches(train.grad_accum, ctx.dist)

        epochs.check(data.epoch_end == "short_step", ctx.dist.world_size)
        if data.streaming:  # the head of the stream stands for its rows until the model loads
            stream.check(data, train)
            self.source = stream.source(data)
            head = stream.head(self.source, stream.CHECK_ROWS)
            train_rows = rows.Rows(source=f"{self.source.label} (the stream's first rows)", rows=head,
                                   lines=list(range(1, len(head) + 1)))
            val_rows = rows.read(data.val, "data.val", split=data.val_split, subset=data.subset, files=data.val_files) if data.val else None
        else:
            train_rows, val_rows = rows.read_data(data)
        if ctx.load_only:  # export / sample: a few rows build TRL's trainer; no data check, no validation rows
            train_rows, val_rows = rows.first_rows(train_rows), None
        self.shape = rows.detect_shape(train_rows, data.shape, data.text_field)
        self.mask = resolve_mask(self.shape, data.mask)
        hf_config = loading.model_config(self.cfg)  # before anything heavy: a missing model is one line
        self.tokenizer = loading.tokenizer(self.cfg)
        with sft.quiet():  # transformers warns about every row longer than the tokenizer's limit
            self.warnings = [] if ctx.load_only else check_rows(
                [r for r in (train_rows, val_rows) if r is not None], tokenizer=self.tokenizer, shape=self.shape,
                mask=self.mask, config=data, max_length=self.cfg.max_length, report=ctx.dist.rank == 0,
            )
        if val_rows is None and not data.streaming and not ctx.load_only:
            train_rows, val_rows = rows.split(train_rows, data.val_fraction, data.split_seed)

        attn = loading.attention(self.cfg.attn_implementation, self.device)
        with sft.quiet():
            model, frozen = loading.model(self.cfg, hf_config, attn=attn, device=self.device)
        checkpointing = self._checkpointing(model)
        self.sft = sft.SFTData(
            model=model, tokenizer=self.tokenizer,
            train_rows=self.source.raw(0, False, 0) if data.streaming else train_rows.rows,
            val_rows=val_rows.rows if val_rows else None, mask=self.mask, packing=data.packing,
            text_field=data.text_field, eos_token=data.eos_token, max_length=self.cfg.max_length,
            batch_size=train.batch_size, seed=ctx.seed, use_cpu=self.device.type == "cpu",
            peft_config=loading.lora(self.hf.lora) if self.hf.lora else None, order=data.order, order_seed=data.order_seed,
            identify=data.record_samples,
        )
        self.record = SampleRecord(ctx.out_dir, rank=ctx.dist.rank, world_size=ctx.dist.world_size) if data.record_samples else None
        self.model = self.sft.model
        neftune.activate(self.model, self.hf.neftune_noise_alpha)  # where Trainer.train() does: after peft, before sharding
        self.stream = self._stream() if data.streaming else None
        self.layout = epochs.Layout(n_rows=len(self.sft.train), batch_size=train.batch_size, grad_accum=train.grad_accum,
                                    short_step=data.epoch_end == "short_step", shuffle=data.shuffle)
        self.max_steps = self.layout.steps(data.epochs) if data.epochs else train.max_steps
        self.base = self.model.get_base_model() if self.hf.lora else self.model
        if self.hf.lora and checkpointing:
            self.model.enable_input_require_grads()  # as TRL does: frozen embeddings, checkpointed blocks
        self._eval_rows: dict[str, list[list[int]]] = {}
        self._input_tokens = None if self.stream else InputTokens(self.sft.train)
        self.aux_coef = self.sft.trainer.router_aux_loss_coef if self.sft.trainer.aux_loss_enabled else 0.0

        step0 = self.stream.step(0) if self.stream else [self.sft.rows("train", r) for r in self.layout.step(self.sft, 0)]
        self._first = self.sft.batch(step0[self.micro[0]])  # measure()'s micro-batch
        fraction, problem = sft.mask_check(step0[0], self.mask)
        if problem and not ctx.load_only:
            raise ConfigError(problem)

        self._place(loss_terms=ctx.loss_terms)
        self.steps_done = 0
        return self._plan(hf_config, attn, frozen, fraction, len(train_rows.rows), len(val_rows.rows) if val_rows else 0)

    def _stream(self) -> stream.TrainStream:
        """The training stream, and the first rows of it as the training rows evaluation scores
        (``train.eval_steps`` batches: a stream has no end to sample from)."""
        train = self.train
        make = functools.partial(stream.TrainStream, src=self.source, prepare=self.sft.prepare, columns=sft.COLUMNS,
                                 shuffle=self.data_cfg.shuffle, seed=self.ctx.seed)
        held = make(batch_size=train.eval_batch_size or train.batch_size, grad_accum=1)
        self.sft.hold([row for step in range(train.eval_steps) for batch in held.step(step) for row in batch])
        return make(batch_size=train.batch_size, grad_accum=train.grad_accum, identify=self.data_cfg.record_samples)

    def _checkpointing(self, model: Any) -> bool:
        """Activation checkpointing per decoder layer (``model.gradient_checkpointing``, or
        ``train.activation_checkpointing``); whether it is on."""
        checkpointing = self.cfg.gradient_checkpointing or self.train.activation_checkpointing
        if checkpointing and not self.cfg.gradient_checkpointing:  # per decoder layer, as model.gradient_checkpointing
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return checkpointing

    def _place(self, *, loss_terms: Any) -> None:
        """``self.model`` over the ranks (``train.parallel``), then its optimizer and the shared step."""
        ctx, train = self.ctx, self.train
        blocks = decoder_layers(self.model, self.base)
        if train.parallel == "fsdp" and not blocks:
            raise ConfigError(f"{type(self.base).__name__} declares no decoder layer class (_no_split_modules) to shard "
                              "one by one; use train.parallel = 'ddp'")
        placed = parallel.for_run(self.model, device=self.device, world_size=ctx.dist.world_size,
                                  sharding=parallel.Sharding.of(train), blocks=blocks, dtype=self.dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # after sharding: FSDP's DTensors
        self.optimizer = from_config(self.model, ctx.optim, self.device.type)
        self.stepper = OptimizerStep(optimizer=self.optimizer, params=self.params, placement=self.placement,
                                     parallel=placed, train=train, dist=ctx.dist, seed=ctx.seed, loss_terms=loss_terms)

    def _plan(self, hf_config: Any, attn: str, frozen: int, fraction: float, n_train: int, n_val: int) -> Plan:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.params)
        steps = range(min(PLAN_SAMPLE_STEPS, self.max_steps))
        sampled = [self._step_batches(s) for s in steps]  # host only: collation, no model
        tokens = sum(b.tokens for batches in sampled for b in batches) / len(sampled)
        trained = sum(b.trained for batches in sampled for b in batches) / len(sampled)
        packing = self.data_cfg.packing or "no"
        details = {
            "model": f"{type(self.base).__name__} ({hf_config.model_type}), attention {attn}",
            "trainable": f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
            + (f", LoRA r={self.hf.lora.r}" if self.hf.lora else "") + (f", vision frozen ({frozen:,})" if frozen else ""),
            **(plan.stream_details(self, n_val=n_val) if self.stream else plan.data_details(self, n_train=n_train, n_val=n_val, packing=packing)),
            "loss mask": f"{self.mask}: {100 * fraction:.1f}% of the first batch's tokens trained",
            "eval loss": eval_loss_line(self.train.eval_loss),
            "tokens/step": f"~{tokens:,.0f} processed, ~{trained:,.0f} trained (mean of the first {len(sampled)} steps)",
            "optimizer": plan.optimizer_line(self.ctx.optim),
            "parallel": parallel.describe(self.train, self.ctx.dist.world_size, self.dtype),
        }
        if self.warnings:
            details["data warnings"] = "; ".join(self.warnings)
        device, dtype = self.placement.names
        return Plan(
            params=trainable, total_params=total, tokens_per_step=round(tokens),
            flops_per_token=(6 if not self.hf.lora else 4) * total,  # forward 2N, backward 4N (2N without weight grads)
            device=device, dtype=dtype,
            summary=f"{self.cfg.name_or_path} fine-tuned on {self.data_cfg.train}",
            details=details, max_steps=self.max_steps, steps_per_epoch=self.layout.steps_per_epoch,
        )

    # --- the step -------------------------------------------------------------------------------

    def _step_batches(self, step: int) -> list[sft.Batch]:
        """Every micro-batch of ``step`` on the host (all ranks': the token count is global);
        fewer than grad_accum only in the short last step of an epoch (``data.epoch_end``)."""
        if self.stream:
            return [self.sft.batch(rows) for rows in self.stream.step(step)]
        return [self.sft.batch(self.sft.rows("train", rows)) for rows in self.layout.step(self.sft, step)]

    def _loss(self, model: Any, batch: tuple[sft.Batch, int, int], with_logits: bool) -> MicroLoss:
        """One micro-batch's share of the step loss: TRL's SFT loss, ``sum CE / n_items`` with
        ``n_items`` the trained tokens of the whole step (all ranks), so accumulation is
        token-exact and bit-identical to ``SFTTrainer``; ``entropy`` and ``mean_token_accuracy``
        as TRL logs them, each micro-batch's token mean averaged over the micro-batches."""
        b, n_items, n_micro = batch  # this micro-batch, the step's trained tokens, this rank's micro-batches
        inputs = sft.to_device(b.inputs, self.device)
        if not with_logits:
            out = model(**inputs, use_cache=False, fused_lm_head=True)  # logits never materialised
            share = -out.log_probs.sum() / n_items
            if self.aux_coef:  # MoE load balancing, as compute_loss averages it over the accumulation
                share = share + self.aux_coef * out.aux_loss / self.train.grad_accum
            per_micro = max(b.trained, 1) * n_micro  # compute_loss: 0 for a micro-batch that trains nothing
            return MicroLoss(share=share, metrics={"entropy": out.entropy.detach().sum() / per_micro,
                                                    "mean_token_accuracy": out.is_top1.sum() / per_micro})
        # a plugin adds loss terms on the logits: the model's own loss over this micro-batch's
        # trained tokens is its mean CE (the value the spec promises loss terms); the share
        # weighs it by the micro-batch's part of the step's trained tokens
        n_mine = max(b.trained, 1)
        out = model(**inputs, use_cache=False, num_items_in_batch=n_mine)
        share = out.loss * (n_mine / n_items)
        return MicroLoss(share=share, ce=out.loss, logits=out.logits[:, :-1], targets=inputs["labels"][:, 1:])

    def train_step(self, step: int) -> StepOutput:
        batches = self._step_batches(step)
        micro = self.micro[: len(batches)]  # a short epoch-end step has fewer (one process only)
        if self.record is not None:  # ids on the host since preparation: no device work
            self.record.write(step + 1, self._recorded(step, micro))
        n_items = max(sum(b.trained for b in batches), 1)  # host ints: no sync
        out = self.stepper.run([(batches[m], n_items, len(micro)) for m in micro], self._loss,
                               tokens=sum(b.trained for b in batches), processed_tokens=sum(b.tokens for b in batches))
        # TRL's num_tokens: a host count into a device tensor (a fill, no sync) read with the rest
        counted = self.stream.trained(step) if self.stream else self._input_tokens.through(self, step)
        out.metrics["num_tokens"] = torch.full((), counted, device=self.device)
        self.steps_done = step + 1
        return out

    def _recorded(self, step: int, micro: list[int]) -> dict[str, list[int]]:
        """The sample record's lists for this rank's micro-batches ``micro`` of ``step``."""
        if self.stream:
            return self.stream.recorded(step, micro)
        rows, drawn = self.layout.step(self.sft, step), self.layout.step_epochs(step)
        return self.sft.row_ids.line([r for m in micro for r in rows[m]], [e for m in micro for e in drawn[m]])

    def evaluate(self, step: int) -> dict[str, Evaluation]:
        """Loss and token accuracy per split over ``train.eval_steps`` fixed batches of
        ``train.eval_batch_size`` rows (0 steps: every row), the same rows at every evaluation:
        the validation rows in file order (``Trainer``'s sequential eval sampler), a fixed sample
        of the training rows. A batch's loss is ``SFTTrainer.compute_loss``'s in eval mode (the
        fused head's CE over the batch's trained tokens; the MoE aux loss it adds is left out);
        ``train.eval_loss`` says how batches combine (``scoring``)."""
        def score(item: tuple[int, sft.Batch]) -> scoring.BatchScore:
            rows, b = item
            inputs = sft.to_device(b.inputs, self.device)
            if self.ctx.eval_metrics is None:
                out = self.model(**inputs, use_cache=False, fused_lm_head=True)  # logits never materialised
                return scoring.BatchScore(-out.log_probs.float().sum(), out.is_top1.sum(), b.trained, rows)
            # plugins' metrics need this batch's (B, T, V) logits: the model's own head and loss,
            # summed over the batch's trained tokens (equal to the fused head's up to rounding)
            n = max(b.trained, 1)
            out = self.model(**inputs, use_cache=False, num_items_in_batch=n)
            logits, targets = out.logits[:, :-1], inputs["labels"][:, 1:]  # (B, T-1, V), (B, T-1)
            correct = ((logits.argmax(-1) == targets) & (targets >= 0)).sum()
            return scoring.BatchScore(out.loss.float() * n, correct, b.trained, rows, logits, targets)

        splits = {split: self._fixed_batches(split) for split in (("train", "val") if self.sft.val is not None else ("train",))}
        return scoring.evaluate(self.model, splits, score, self.stepper.autocast, self.device, mean=self.train.eval_loss,
                                metrics=self.ctx.eval_metrics)

    def _fixed_batches(self, split: str) -> Iterator[tuple[int, sft.Batch]]:
        """(rows, collated batch) of ``split``'s evaluation, collated as they are scored: the rows
        are chosen once, and a whole split is never held collated at once."""
        if split not in self._eval_rows:
            n_rows = len(self.sft.train if split == "train" else self.sft.val)
            size = self.train.eval_batch_size or self.train.batch_size
            count = min(self.train.eval_steps * size, n_rows) if self.train.eval_steps else n_rows
            chosen = [int(i) for i in self.sft.order(split, EVAL_EPOCH, split == "train")[:count]]
            self._eval_rows[split] = [chosen[i : i + size] for i in range(0, count, size)]
        return ((len(rows), self.sft.batch(self.sft.rows(split, rows))) for rows in self._eval_rows[split])

    # --- state, inference, measurement ----------------------------------------------------------

    def save(self, directory: Path) -> None:
        weights.save(self, directory)

    def load(self, directory: Path) -> None:
        weights.load(self, directory)

    def generate(self, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 200, seed: int = 0) -> str:
        return inference.generate(self, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                  seed=seed, synced=self.stepper.parallel.sharded and self.ctx.dist.world_size > 1)

    def layer_stats(self) -> dict[str, float]:
        return inference.layer_stats(self.base)

    def measure(self, steps: int = 2) -> float:
        """Seconds per optimizer step from forward/backward of the first micro-batch (after one
        untimed warm-up), times the micro-batches of a step; weights, optimizer and RNG untouched."""
        batch = self._first
        return self.stepper.measure((batch, max(batch.trained, 1), 1), self._loss, steps=steps, micro_batches=len(self.micro))

    def close(self) -> None:
        super().close()
        workdir = getattr(getattr(self, "sft", None), "workdir", None)
        if workdir is not None:
            workdir.cleanup()


def eval_loss_line(mean: str) -> str:
    """The plan's line for ``train.eval_loss``: which number the eval loss is."""
    if mean == "batches":
        return ("batches: each eval batch's token mean, weighted by its rows, as Trainer.evaluate()'s eval_loss "
                "(train.eval_loss = 'tokens' for the mean over every token)")
    return "tokens: the mean over every scored token (train.eval_loss = 'batches' for Trainer.evaluate()'s eval_loss)"

