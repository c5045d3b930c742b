"""The ``hf`` backend with ``[hf] objective = "dpo"``: preference optimisation under the kernel's
loop, TRL's ``DPOTrainer`` as a library (see ``dpo.py``), its loss replicated in ``dpo_loss.py``.

Each micro-batch is one forward of its chosen and rejected rows together (TRL's collator stacks
them), and its share of the step loss is ``mean over its pairs / micro-batches of the step``,
as ``Trainer`` scales a loss that is not token-normalised for gradient accumulation; so the losses
equal ``DPOTrainer.train()``'s bit for bit on the same batches. TRL's metrics, under its names
(``rewards/*``, ``logps/*``, ``logits/*``, ``entropy``, ``mean_token_accuracy``: each a mean over
the step's micro-batches, as TRL averages them over a logging step; ``num_tokens``: the attention
mask's tokens trained so far, on a resume too) come back as device tensors, read by the kernel on
logged steps only. Everything else (the optimizer step, DDP, checkpoints, generation) is the SFT
backend's, inherited.

``hf.dpo.too_long``: a pair whose prompt alone fills ``model.max_length`` is a one-line error
(``error``), or left out by TRL's preparation (``drop``, counted in the plan); TRL cuts the
others at ``max_length`` (prompt + completion, the end cut off).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainctl.backends import parallel, scoring
from trainctl.backends.device import set_threads
from trainctl.backends.hf import dpo, epochs, loading, neftune, plan, rows, sft
from trainctl.backends.hf.backend import EVAL_EPOCH, HFBackend, decoder_layers
from trainctl.backends.hf.config import resolve_reference
from trainctl.backends.hf.dpo_loss import dpo_loss, policy_metrics, reward_metrics
from trainctl.backends.hf.preference_check import require_valid_preferences
from trainctl.backends.step import MicroLoss, local_micro_batches
from trainctl.kernel.backend import Evaluation, Plan, StepOutput
from trainctl.kernel.errors import ConfigError


class DPOBackend(HFBackend):
    def setup(self) -> Plan:
        ctx, data, train, opts = self.ctx, self.data_cfg, self.train, self.hf.dpo
        set_threads(train.threads)
        if train.compile:
            raise ConfigError("train.compile is not supported by the hf backend (TRL's fused loss head is patched in at run time); set it to false")
        if data.packing:
            raise ConfigError('data.packing is for objective = "sft"; DPO pads each pair batch (set data.packing = false)')
        if data.record_samples:
            raise ConfigError('data.record_samples records the rows objective = "sft" trains; DPO does not record its '
                              "preference pairs yet: set data.record_samples = false")
        if data.shape != "auto" or data.mask != "auto":
            raise ConfigError('data.shape and data.mask are for objective = "sft"; DPO reads prompt/chosen/rejected and '
                              'scores the completions only (leave them "auto")')
        if ctx.loss_terms is not None:
            raise ConfigError('loss-term plugins need token logits, which objective = "dpo" never builds; remove them or use "sft"')
        if ctx.eval_metrics is not None:
            raise ConfigError("hf.objective = 'dpo' evaluates preference pairs, not token predictions: an eval metric "
                              "plugin (trainctl_eval_metrics) has nothing to score; remove it from plugins")
        self.micro = local_micro_batches(train.grad_accum, ctx.dist)
        epochs.check(data.epoch_end == "short_step", ctx.dist.world_size)
        self.reference = resolve_reference(opts.reference, self.hf.lora is not None, bool(opts.ref_model))

        if data.streaming:
            raise ConfigError('data.streaming reads SFT rows; [hf] objective = "dpo" reads its preference pairs into memory: '
                              "set data.streaming = false")
        train_rows, val_rows = rows.read_data(data)
        if ctx.load_only:  # export / sample: a few pairs build TRL's trainer; no data check, no validation pairs
            train_rows, val_rows = rows.first_rows(train_rows), None
        if not train_rows.rows:
            raise ConfigError(f"{train_rows.source} has no rows; give a file with at least one preference pair")
        self.shape = dpo.preference_shape(train_rows.rows[0], train_rows.source)
        hf_config = loading.model_config(self.cfg)
        if getattr(hf_config.get_text_config(), "output_router_logits", None) is not None:
            raise ConfigError('objective = "dpo" does not add the MoE load-balancing loss yet; use a dense model or objective = "sft"')
        self.tokenizer = loading.tokenizer(self.cfg)
        for key, found in (("data.train", train_rows), ("data.val", val_rows)):
            if found is not None and not ctx.load_only:  # before the model loads: a bad pair is one line, exit 2
                require_valid_preferences(found, source=key, tokenizer=self.tokenizer, max_length=self.cfg.max_length,
                                          too_long=opts.too_long)
        if val_rows is None and not ctx.load_only:
            train_rows, val_rows = rows.split(train_rows, data.val_fraction, data.split_seed)

        attn = loading.attention(self.cfg.attn_implementation, self.device)
        with sft.quiet():
            model, frozen = loading.model(self.cfg, hf_config, attn=attn, device=self.device)
            # the frozen reference, loaded as TRL loads it (same dtype and attention): the starting
            # weights, or a separate model (hf.dpo.ref_model), which precomputed log-probs come from too
            ref = None
            if self.reference == "copy" or opts.ref_model:
                ref_cfg = dataclasses.replace(self.cfg, name_or_path=opts.ref_model) if opts.ref_model else self.cfg
                ref_hf_config = loading.model_config(ref_cfg) if opts.ref_model else hf_config
                ref = loading.model(ref_cfg, ref_hf_config, attn=attn, device=self.device)[0]
        checkpointing = self._checkpointing(model)
        if ref is not None:
            ref.eval().requires_grad_(False)
        self.pairs = dpo.PreferenceData(
            model=model, ref_model=ref, tokenizer=self.tokenizer, train_rows=train_rows.rows,
            val_rows=val_rows.rows if val_rows else None, max_length=self.cfg.max_length,
            batch_size=train.batch_size, seed=ctx.seed, use_cpu=self.device.type == "cpu",
            peft_config=loading.lora(self.hf.lora) if self.hf.lora else None, reference=self.reference,
            beta=opts.beta, loss_type=opts.loss_type, label_smoothing=opts.label_smoothing,
            order=data.order, order_seed=data.order_seed,
        )
        if self.pairs.ref_model is not None:
            self.pairs.ref_model.to(self.device)  # accelerate placed it on its own idea of the device
        self.model = self.pairs.model
        neftune.activate(self.model, self.hf.neftune_noise_alpha)  # DPOConfig inherits it from TrainingArguments
        self.layout = epochs.Layout(n_rows=len(self.pairs.train), batch_size=train.batch_size, grad_accum=train.grad_accum,
                                    short_step=data.epoch_end == "short_step", shuffle=data.shuffle)
        self.max_steps = self.layout.steps(data.epochs) if data.epochs else train.max_steps
        self.base = self.model.get_base_model() if self.hf.lora else self.model
        if self.hf.lora and checkpointing:
            self.model.enable_input_require_grads()  # as TRL does: frozen embeddings, checkpointed blocks
        self._eval_batches: dict[str, list[dpo.PairBatch]] = {}

        self._place(loss_terms=None)  # the policy over the ranks (ddp or fsdp), its optimizer, the shared step
        self.reference_line = self.reference + (f" ({opts.ref_model})" if opts.ref_model else "")
        if self.pairs.ref_model is not None and self.stepper.parallel.sharded:  # a frozen copy sharded as the policy is
            self.stepper.parallel.shard_frozen(self.pairs.ref_model, decoder_layers(self.pairs.ref_model, self.pairs.ref_model))
            self.reference_line += ", sharded over the ranks"
        if self.reference == "precomputed" and not ctx.load_only:  # before any step, and before a resume loads weights
            self.reference_line = self.pairs.precompute(ctx.out_dir, device=self.device, autocast=self.stepper.autocast,
                                                        batch_size=train.batch_size, rank=ctx.dist.rank,
                                                        world=ctx.dist.world_size, lockstep=self.stepper.parallel.sharded,
                                                        source=opts.ref_model or "the starting weights")
            self.pairs.ref_model = self.pairs.trainer.ref_model = None  # a separate reference: cached now, freed
        self.steps_done = 0
        self.row_tokens = self._row_tokens()
        self.num_tokens = torch.zeros((), dtype=torch.long, device=self.device)  # TRL's num_tokens, on the device
        return self._dpo_plan(hf_config, attn, frozen, len(train_rows.rows), len(val_rows.rows) if val_rows else 0)

    def _dpo_plan(self, hf_config: Any, attn: str, frozen: int, n_train: int, n_val: int) -> Plan:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.params)
        sampled = [self._step_batches(s) for s in range(min(8, self.max_steps))]  # host only: collation
        tokens = sum(b.tokens for batches in sampled for b in batches) / len(sampled)
        kept, opts = len(self.pairs.train), self.hf.dpo
        kept_val = len(self.pairs.val) if self.pairs.val is not None else 0
        details = {
            "model": f"{type(self.base).__name__} ({hf_config.model_type}), attention {attn}",
            "trainable": f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
            + (f", LoRA r={self.hf.lora.r}" if self.hf.lora else "") + (f", vision frozen ({frozen:,})" if frozen else ""),
            "objective": f"DPO ({opts.loss_type}, beta {opts.beta:g}) on {self.shape}-prompt pairs",
            "reference": self.reference_line,
            "data": f"{n_train} train pairs, {kept} kept; {n_val} val pairs" + (f", {kept_val} kept" if n_val > kept_val else ""),
            "run length": (f"{self.max_steps} steps x {self.layout.rows_per_step} pairs = {self.layout.epochs(self.max_steps):.2f} epochs; "
                           f"{plan.order_line(self.pairs, self.layout.shuffle)}"),
            "tokens/step": f"~{tokens:,.0f} processed (chosen + rejected, mean of the first {len(sampled)} steps)",
            "parallel": parallel.describe(self.train, self.ctx.dist.world_size, self.dtype),
        }
        dropped = n_train - kept + n_val - kept_val
        if dropped:  # only under too_long = "drop": "error" stopped at the data check
            details["dropped"] = (f"{dropped} pairs dropped ({n_train - kept} train, {n_val - kept_val} val): the prompt alone "
                                  f"fills model.max_length {self.cfg.max_length} (hf.dpo.too_long = drop)")
        device, dtype = self.placement.names
        in_loop_ref = 2 if self.reference in ("copy", "adapters_off") else 0  # the reference's forward
        return Plan(
            params=trainable, total_params=total, tokens_per_step=round(tokens),
            flops_per_token=((6 if not self.hf.lora else 4) + in_loop_ref) * total,
            device=device, dtype=dtype, summary=f"{self.cfg.name_or_path} DPO on {self.data_cfg.train}",
            details=details, max_steps=self.max_steps, steps_per_epoch=self.layout.steps_per_epoch,
        )

    # --- the step -------------------------------------------------------------------------------

    def _step_batches(self, step: int) -> list[dpo.PairBatch]:
        return [self.pairs.batch("train", indices) for indices in self.layout.step(self.pairs, step)]

    def _pair_loss(self, model: Any, inputs: dict[str, Any]) -> tuple[Any, Any, Any]:
        """The concatenated forward (chosen rows, then rejected) and its DPO loss, as
        ``DPOTrainer._compute_loss`` runs them: summed completion log-probs of the policy, then
        of the reference."""
        return self._pair_forward(model, inputs)[:3]

    def _pair_forward(self, model: Any, inputs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
        """``_pair_loss`` and the policy's fused-head outputs (for TRL's token metrics)."""
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                    labels=labels, fused_lm_head=True)
        seq_len = completion_mask.size(1) - 1
        chosen_logps, rejected_logps = out.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)  # (B,), (B,)
        ref_chosen, ref_rejected = self.pairs.reference_logps(inputs)
        opts = self.hf.dpo
        loss = dpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, completion_mask, beta=opts.beta,
                        loss_type=opts.loss_type, label_smoothing=opts.label_smoothing)
        return loss, chosen_logps, rejected_logps, out

    def _loss(self, model: Any, batch: tuple[dpo.PairBatch, int, int], with_logits: bool) -> MicroLoss:
        """One micro-batch's share: its mean pair loss over the step's micro-batches (all ranks),
        and TRL's metrics as shares of this rank's mean over its micro-batches."""
        b, n_micro, n_local = batch
        inputs = sft.to_device(b.inputs, self.device)
        loss, chosen_logps, rejected_logps, out = self._pair_forward(model, inputs)
        found = reward_metrics(loss, chosen_logps, rejected_logps) | policy_metrics(out, inputs["completion_mask"])
        return MicroLoss(share=loss.per_pair.mean() / n_micro, metrics={k: v / n_local for k, v in found.items()})

    def train_step(self, step: int) -> StepOutput:
        batches = self._step_batches(step)
        micro = self.micro[: len(batches)]  # a short epoch-end step has fewer (one process only)
        out = self.stepper.run([(batches[m], len(batches), len(micro)) for m in micro], self._loss,
                               tokens=sum(b.trained for b in batches), processed_tokens=sum(b.tokens for b in batches))
        self.num_tokens.add_(self._step_tokens(step))  # a host int into a device tensor: no sync
        out.metrics["num_tokens"] = self.num_tokens.clone()  # this step's total, whatever later steps add
        self.steps_done = step + 1
        return out

    def _row_tokens(self) -> np.ndarray:
        """(N,) tokens of each training pair that the attention mask keeps (chosen + rejected,
        each cut at max_length as TRL's collator cuts them): what TRL's ``num_tokens`` counts."""
        table = self.pairs.train.with_format("arrow")[:]
        prompt, chosen, rejected = (np.diff(np.asarray(table[name].combine_chunks().offsets)) for name in dpo.COLUMNS)
        limit = self.cfg.max_length
        return np.minimum(prompt + chosen, limit) + np.minimum(prompt + rejected, limit)

    def _step_tokens(self, step: int) -> int:
        """The attention-mask tokens of every micro-batch of ``step``, all ranks' (host only)."""
        return int(sum(self.row_tokens[indices].sum() for indices in self.layout.step(self.pairs, step)))

    def load(self, directory: Path) -> None:
        """The checkpoint, and ``num_tokens`` counted again over the steps before it (host only),
        so a resumed run logs what the uninterrupted one does (TRL's restarts from 0)."""
        super().load(directory)
        self.num_tokens.fill_(sum(self._step_tokens(s) for s in range(self.steps_done)))

    def evaluate(self, step: int) -> dict[str, Evaluation]:
        """Per split over ``train.eval_steps`` fixed batches of ``train.eval_batch_size`` pairs (0:
        every pair of the split): the mean DPO loss over the pairs and the reward accuracy (pairs
        whose chosen reward beats the rejected one); ``tokens`` counts pairs. The pair mean is what
        ``Trainer``'s evaluation reports for DPO too: it weighs each batch's mean loss by its rows;
        ``train.eval_loss = "batches"`` says so and makes the accuracy the mean of the batches'
        (``DPOTrainer`` averages its stored ``rewards/accuracies`` over the eval batches)."""
        def score(b: dpo.PairBatch) -> scoring.BatchScore:
            loss, _, _ = self._pair_loss(self.model, sft.to_device(b.inputs, self.device))
            won = (loss.chosen_rewards > loss.rejected_rewards).sum()
            return scoring.BatchScore(loss.per_pair.float().sum(), won, b.pairs, rows=b.pairs)

        splits = {}
        for split in ("train", "val") if self.pairs.val is not None else ("train",):
            splits[split] = self._eval_batches.get(split) or self._eval_batches.setdefault(split, self._fixed_pairs(split))
        # the DPO loss is no cross-entropy: no perplexity; the accuracy is the reward accuracy
        return scoring.evaluate(self.model, splits, score, self.stepper.autocast, self.device, cross_entropy=False,
                                mean=self.train.eval_loss)

    def _fixed_pairs(self, split: str) -> list[dpo.PairBatch]:
        n_rows = len(self.pairs.train if split == "train" else self.pairs.val)
        size = self.train.eval_batch_size or self.train.batch_size
        count = min(self.train.eval_steps * size, n_rows) if self.train.eval_steps else n_rows
        chosen = [int(i) for i in self.pairs.order(split, EVAL_EPOCH, split == "train")[:count]]
        return [self.pairs.batch(split, chosen[i : i + size]) for i in range(0, count, size)]

    def measure(self, steps: int = 2) -> float:
        batch = self._step_batches(0)[self.micro[0]]
        return self.stepper.measure((batch, len(self.micro), 1), self._loss, steps=steps, micro_batches=len(self.micro))

    def close(self) -> None:
        super().close()
        if hasattr(self, "pairs"):  # setup may have failed before it existed
            self.pairs.workdir.cleanup()
