"""TRL's ``GRPOTrainer`` used as a library, as ``dpo.py`` uses ``DPOTrainer``, and the in-process
producer of the kernel's rollout seam (``trainctl.kernel.rollout``).

What is TRL's, called as it is: the prompt order (its ``RepeatSampler`` through its own train
dataloader: each prompt ``num_generations`` times, each generation batch repeated for
``num_iterations x steps_per_generation`` micro-batches), generation (``_generate_and_score_completions``:
the chat template, transformers' ``generate`` with its sampling settings, truncation masks, the
rewards weighted by ``reward_weights``, group-normalised advantages, old and reference
log-probs), the buffering of one generation over ``steps_per_generation`` micro-batches
(``_prepare_inputs``, with its shuffle) and the loss (``_compute_loss``: clipped ratios, KL,
the ``loss_type`` normalisations), with every metric under TRL's names.

What is reproduced, because it lives in ``Trainer.train()``'s loop, which is never run: the
micro-batch counter ``_step`` that ``training_step`` advances (here after each micro-batch is
prepared: nothing between reads it), ``current_gradient_accumulation_steps`` that the loop sets
before a step, a new pass over the same dataloader when an epoch ends (so ``RepeatSampler``'s
generator goes on to its next order, as ``train()``'s epochs do), and ``log()``'s mean of each
metric's values over the step. The optimizer step itself is the kernel's shared one.

The producer's state (``state``/``restore``) is what ``grpo_state.py`` puts in a checkpoint: TRL's
counters, the buffered generation and the dataloader's place in its pass.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from trainctl.backends.hf import sft
from trainctl.backends.hf.config import GRPOConfig
from trainctl.backends.hf.grpo_state import ProducerState
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.rollout import Rollout


def trl_args(opts: GRPOConfig, *, output_dir: str, batch_size: int, grad_accum: int, seed: int, use_cpu: bool,
             checkpointing: bool, world_size: int = 1) -> Any:
    """``trl.GRPOConfig`` of ``[hf.grpo]`` (TRL's names; its None where ours says 0).
    ``checkpointing`` is ``model.gradient_checkpointing`` (TRL's default is on, ours off).
    ``grad_accum`` is this rank's micro-batches; TRL's ``steps_per_generation`` is per process
    too (its generation batch is ``batch_size x steps_per_generation x processes``), ours the
    step's: divided by the ranks, so any number of them generates the same global batch."""
    from trl import GRPOConfig as TRLGRPOConfig

    return TRLGRPOConfig(
        output_dir=output_dir, report_to=[], use_cpu=use_cpu, seed=seed, bf16=False, fp16=False,
        activation_checkpointing=checkpointing, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        num_generations=opts.num_generations, max_completion_length=opts.max_completion_length,
        temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k, beta=opts.beta, epsilon=opts.epsilon,
        epsilon_high=opts.epsilon_high or None, num_iterations=opts.num_iterations, loss_type=opts.loss_type,
        scale_rewards=opts.scale_rewards, mask_truncated_completions=opts.mask_truncated_completions,
        importance_sampling_level=opts.importance_sampling_level,
        reward_weights=list(opts.reward_weights) or None, steps_per_generation=opts.steps_per_generation // world_size or None,
        save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True, log_level="error",
    )


class InProcessRollouts:
    """The policy generates its own batches: TRL's trainer, driven one optimizer step at a time.
    A :class:`trainctl.kernel.rollout.Producer`."""

    def __init__(self, *, model: Any, tokenizer: Any, rows: list[dict[str, Any]], rewards: list[Any],
                 reward_names: list[str], reward_tokenizers: list[Any], opts: GRPOConfig, batch_size: int,
                 grad_accum: int, seed: int, use_cpu: bool, peft_config: Any, checkpointing: bool,
                 world_size: int = 1) -> None:
        from datasets import Dataset
        from trl import GRPOTrainer

        self.workdir = tempfile.TemporaryDirectory(prefix="trainctl-grpo-")  # Trainer wants an output_dir
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        args = trl_args(opts, output_dir=self.workdir.name, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                        use_cpu=use_cpu, checkpointing=checkpointing, world_size=world_size)
        try:
            with sft.quiet():
                self.trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, processing_class=tokenizer,
                                           reward_processing_classes=reward_tokenizers,
                                           train_dataset=Dataset.from_list(rows), peft_config=peft_config)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:  # TRL's own checks of the settings and data
            raise ConfigError(f"TRL cannot set up GRPO: {str(exc).splitlines()[0]}") from None
        # TRL names a reward model after its folder; ours are named as hf.grpo.rewards spells them
        self.trainer.reward_func_names = list(reward_names)
        self.model = self.trainer.model.train()  # a PeftModel when LoRA is on; in training mode, as train() puts it
        self.loss_side = self  # the trainer whose loss a step computes (an off-policy producer's is another's)
        self.grad_accum, self.world = grad_accum, world_size
        self.trainer.current_gradient_accumulation_steps = grad_accum  # Trainer.train() sets it per step
        steps_per_generation = self.trainer.args.steps_per_generation
        self.generate_every = steps_per_generation * self.trainer.num_iterations  # micro-batches per generation
        # a generation trained on for num_iterations x steps_per_generation micro-batches is that
        # many optimizer steps old at its last use: TRL's reuse is the staleness it allows
        self.max_staleness = max(-(-self.generate_every // grad_accum) - 1, 0)
        self.loader: Any = None  # TRL's train dataloader, made at the first rollout as train() makes it
        self.batches: Iterator[Any] | None = None  # the current pass over it
        self.pass_start: Any = None  # RepeatSampler's generator state before the pass drew its order
        self.consumed = 0  # generation batches of the current pass handed out
        self.generated_version = 0

    def next_rollout(self, step: int, version: int) -> Rollout:
        """The step's ``grad_accum`` micro-batches, prepared by TRL (generating when its cadence
        says so: every ``steps_per_generation x num_iterations`` micro-batches)."""
        trainer = self.trainer
        started = time.perf_counter()
        micro, generated = [], False
        for _ in range(self.grad_accum):
            if trainer._step % self.generate_every == 0 or trainer._buffered_inputs is None:
                generated, self.generated_version = True, version
            micro.append(trainer._prepare_inputs(self._next_batch()))
            trainer._step += 1  # training_step's count, which _prepare_inputs reads
        completions = sum(int(inputs["completion_mask"].size(0)) for inputs in micro)
        tokens = sum(int(inputs["completion_mask"].sum()) for inputs in micro)  # host ints: the rewards synced already
        if self.world > 1:  # the step's counts over all ranks, through TRL's accelerator as its own metrics go
            completions, tokens = (int(n) for n in trainer.accelerator.gather(
                torch.tensor([[completions, tokens]], device=trainer.accelerator.device)).sum(0))  # a host sync, as TRL's metrics are
        metrics = trainer._metrics["train"]
        stats = {"reward": metrics["reward"][-1]} if generated and metrics.get("reward") else {}
        return Rollout(batch=micro, policy_version=self.generated_version, completions=completions, tokens=tokens,
                       generation_s=time.perf_counter() - started, reused=not generated, stats=stats)

    def skip(self) -> None:
        """Pass over one step's batch without generating it (a rollout worker asked for a later
        batch: another worker makes this one): the prompt stream and TRL's counter move on."""
        for _ in range(self.grad_accum):
            self._next_batch()
            self.trainer._step += 1
        self.trainer._buffered_inputs = None

    def _next_batch(self) -> Any:
        if self.batches is None:
            self._start_pass()
        try:
            batch = next(self.batches)
        except StopIteration:  # an epoch ended: Trainer iterates its dataloader again (RepeatSampler's next order)
            self._start_pass()
            batch = next(self.batches)
        self.consumed += 1
        return batch

    def _start_pass(self) -> None:
        generator = self.generator()
        # RepeatSampler draws the pass's order at its first batch, from this state
        self.pass_start = generator.get_state() if generator is not None else None
        self.batches, self.consumed = iter(self.dataloader()), 0

    def dataloader(self) -> Any:
        """TRL's train dataloader, made once as ``train()`` makes it: each pass iterates it again."""
        if self.loader is None:
            self.loader = self.trainer.get_train_dataloader()
        return self.loader

    def generator(self) -> torch.Generator | None:
        """RepeatSampler's own generator (None when TRL does not shuffle)."""
        batches = self.dataloader().batch_sampler
        batches = getattr(batches, "batch_sampler", batches)  # on several processes accelerate's BatchSamplerShard
        return getattr(batches.sampler, "generator", None)

    # --- the checkpoint's part ------------------------------------------------------------

    def state(self) -> ProducerState:
        trainer = self.trainer
        return ProducerState(step=trainer._step, generated_version=self.generated_version,
                             tokens_seen=int(trainer.state.num_input_tokens_seen), consumed=self.consumed,
                             pass_start=self.pass_start, buffered=trainer._buffered_inputs)

    def restore(self, state: ProducerState) -> None:
        """Go on from ``state``: the counters and buffer as they were, and the dataloader's pass
        replayed from its generator state to the batch it had reached (batches are only
        collated, nothing is generated). Iterating a DataLoader draws its base seed from the
        global generator, which the checkpoint has just restored: it is put back after."""
        trainer = self.trainer
        trainer._step, self.generated_version = state.step, state.generated_version
        trainer.state.num_input_tokens_seen = state.tokens_seen
        trainer._buffered_inputs = state.buffered
        if not state.consumed:
            return  # no rollout yet: the first one starts the first pass
        rng = torch.get_rng_state()
        generator = self.generator()
        if generator is not None and state.pass_start is not None:
            generator.set_state(state.pass_start)
        self.pass_start, self.batches = state.pass_start, iter(self.dataloader())
        for _ in range(state.consumed):
            next(self.batches)
        self.consumed = state.consumed
        torch.set_rng_state(rng)

    def publish(self, version: int) -> None:
        """Nothing to copy: the policy generates with its own weights."""

    def hold(self, paused: bool) -> None:
        """Nothing runs between steps: a paused kernel asks for no rollout."""

    def for_training(self, step: int, rollout: Rollout) -> list[dict[str, Any]]:
        """The step's micro-batches, as TRL prepared them."""
        return rollout.batch

    def logps(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """``model``'s log-probs of the micro-batch's completion tokens, (B, C): TRL's own
        ``_get_per_token_logps_and_entropies``, as ``_generate_and_score_completions`` calls it."""
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)  # (B, P + C)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        return self.trainer._get_per_token_logps_and_entropies(
            model, ids, mask, inputs["completion_ids"].size(1),
            batch_size=self.trainer.args.per_device_train_batch_size)[0]

    def step_metrics(self) -> dict[str, float]:
        """TRL's metrics of the step just trained, as ``GRPOTrainer.log`` reports a one-step
        logging window (the mean of each metric's values), then forgotten."""
        metrics = self.trainer._metrics["train"]
        found = {name: sum(values) / len(values) for name, values in metrics.items() if values}
        metrics.clear()
        return found

    def loss(self, model: Any, inputs: dict[str, Any]) -> Any:
        """One micro-batch's share of the step loss: TRL's ``_compute_loss``, already divided as
        its ``loss_type`` says for gradient accumulation. On several ranks TRL's loss is each
        rank's estimate of the whole step's (its normalisers are global: ``num_items_in_batch``
        gathered, the advantages normalised over the gathered rewards; ``Trainer`` lets DDP average
        them), so a rank's share of it is that over the ranks."""
        loss = self.trainer._compute_loss(model, inputs)
        return loss / self.world if self.world > 1 else loss

    def close(self) -> None:
        self.workdir.cleanup()
