"""The ``hf`` backend with ``[hf] objective = "grpo"``: online RL under the kernel's loop, the first
rollout backend (``trainctl.kernel.rollout``). TRL's ``GRPOTrainer`` is the library (``grpo.py``):
its sampler, generation, rewards, advantages and loss; the kernel asks the in-process producer
for each step's batch, and the optimizer step (clipping, the skip of non-finite updates) is the
shared ``trainctl.backends.step``'s, as for SFT and DPO. So a step is ``GRPOTrainer.train()``'s
step: same completions, rewards, loss, KL and clip ratios for the same seed
(``tests/test_grpo_parity.py``).

Everything that can be refused is refused before the model loads: no reward, a reward that
does not resolve, a reward model folder that is not one (``reward_model.py``: loaded before
the policy too), a prompt column the data lacks, a generation batch that ``num_generations``
does not divide. Rewards are read on the host by nature (they score decoded text), so TRL's
metrics come back as host floats (``StepOutput.host_metrics``) rather than device tensors.

A checkpoint holds, beside the hf backend's files, the producer's state (``grpo_state.py``), so a
resumed run trains on the prompts, completions and rewards the uninterrupted one would have
(``tests/test_grpo_resume.py``); a resume that changes what the stream depends on is refused.

On several ranks TRL's own multi-process logic shares the generation (``grpo.py``); under FSDP
every generated token is a forward that all-gathers the layers, so a rank whose completions ended
must keep running the longest rank's: ``fully_shard`` marks the modules it manages
(``_is_fsdp_managed_module``) and transformers' ``generate`` turns ``synced_gpus`` on for them.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from trainctl.backends.device import set_threads
from trainctl.backends.hf import (grpo, grpo_async, grpo_remote, grpo_state, loading, reward_model, rewards, rows,
                                  sft)
from trainctl.backends.hf.backend import HFBackend
from trainctl.backends.hf.config import GRPOConfig
from trainctl.backends.step import MicroLoss, local_micro_batches
from trainctl.kernel.backend import Evaluation, Plan, StepOutput
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.rollout import Rollout


class GRPOBackend(HFBackend):
    def setup(self) -> Plan:
        ctx, data, train, opts = self.ctx, self.data_cfg, self.train, self.hf.grpo
        model, producer = self._policy()
        steps_per_generation = opts.steps_per_generation or train.grad_accum
        generation_batch = train.batch_size * steps_per_generation
        scorer, prompts, hf_config, attn = self.scorer, self.prompts, self.hf_config, self.attn
        # the generator's policy, before TRL wraps it (rollout workers hold their own)
        copy = copy_module.deepcopy(model) if opts.max_staleness and not opts.rollout_workers else None
        self.producer = producer(model)
        if opts.rollout_workers:
            self.producer = grpo_remote.RemoteRollouts(trainer_side=self.producer, opts=opts, grad_accum=train.grad_accum,
                                                       weights=ctx.out_dir / grpo_remote.WEIGHTS_DIR)
        elif copy is not None:
            self.producer = grpo_async.AsyncRollouts(trainer_side=self.producer, generator_side=producer(copy),
                                                     opts=opts, grad_accum=train.grad_accum)
        self.model = self.producer.model
        self.base = self.model.get_base_model() if self.hf.lora else self.model
        self.max_steps = train.max_steps
        self._place(loss_terms=None)
        self.steps_done = 0
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.params)
        weights = opts.reward_weights or (1.0,) * len(self.reward_names)
        device, dtype = self.placement.names
        return Plan(
            params=trainable, total_params=total, tokens_per_step=generation_batch * opts.max_completion_length // steps_per_generation,
            flops_per_token=(6 if not self.hf.lora else 4) * total, device=device, dtype=dtype,
            summary=f"{self.cfg.name_or_path} GRPO on prompts of {data.train}", max_steps=self.max_steps,
            details={
                "model": f"{type(self.base).__name__} ({hf_config.model_type}), attention {attn}",
                "objective": f"GRPO ({opts.loss_type}, beta {opts.beta:g}, epsilon {opts.epsilon:g}), "
                             f"{opts.num_generations} completions per prompt of up to {opts.max_completion_length} tokens",
                "rewards": ", ".join(f"{name} x {w:g}" for name, w in zip(self.reward_names, weights)),
                **({"reward model": f"{opts.reward_model}: {type(scorer[0]).__name__}, "
                                    f"{sum(p.numel() for p in scorer[0].parameters()):,} parameters, frozen "
                                    "(its weights are in the memory plan)"} if scorer else {}),
                "rollouts": self._rollouts_line(steps_per_generation),
                "data": f"{len(prompts)} prompts",
                "tokens/step": "at most, completions only; the estimate below leaves generation out",
            },
        )

    def _rollouts_line(self, steps_per_generation: int) -> str:
        """Where the batches come from, for the plan."""
        opts = self.hf.grpo
        if opts.rollout_workers:
            return (f"{len(opts.rollout_workers)} rollout worker(s) ({', '.join(opts.rollout_workers)}), up to "
                    f"{opts.max_staleness} versions ahead, weights in {self.ctx.out_dir / grpo_remote.WEIGHTS_DIR}")
        if opts.max_staleness:
            return f"a generator thread with its own policy copy, up to {opts.max_staleness} versions ahead"
        return (f"in process, a generation every {steps_per_generation * opts.num_iterations} micro-batches "
                f"(max staleness {self.producer.max_staleness})")

    def generator_side(self) -> grpo.InProcessRollouts:
        """What a rollout worker generates with (``trainctl rollout-worker``): the policy and TRL's
        trainer as this run's generator thread has them, from the same config (model folder,
        prompts, rewards, seed), checked as ``setup`` checks them."""
        if not self.hf.grpo.max_staleness:
            raise ConfigError('a rollout worker generates ahead of the trainer: its config needs hf.objective = "grpo" '
                              "and hf.grpo.max_staleness >= 1, as the trainer's")
        model, producer = self._policy()
        return producer(model)

    def _policy(self) -> tuple[Any, Any]:
        """The checks, prompts, rewards and policy model of the run, and the factory of an
        ``InProcessRollouts`` around a policy."""
        ctx, data, train, opts = self.ctx, self.data_cfg, self.train, self.hf.grpo
        set_threads(train.threads)
        self._refuse_unsupported()
        self.micro = local_micro_batches(train.grad_accum, ctx.dist)
        steps_per_generation = opts.steps_per_generation or train.grad_accum
        generation_batch = train.batch_size * steps_per_generation
        if generation_batch % opts.num_generations:
            raise ConfigError(f"hf.grpo.num_generations {opts.num_generations} does not divide the generation batch "
                              f"{generation_batch} (train.batch_size {train.batch_size} x steps_per_generation "
                              f"{steps_per_generation}); make the batch a multiple of it")
        train_rows = rows.read_data(data)[0]
        if not train_rows.rows:
            raise ConfigError(f"{train_rows.source} has no rows; give a file with at least one prompt")
        columns = list(train_rows.rows[0])
        if opts.prompt_column not in columns:
            raise ConfigError(f"{train_rows.source} has no column {opts.prompt_column!r} (columns: {', '.join(columns)}); "
                              "set hf.grpo.prompt_column to the column holding the prompts")
        self.reward_names = list(opts.rewards)
        self.scorer = scorer = self._reward_model()  # checked and loaded before the policy: a refusal costs nothing
        funcs = [scorer[0] if name == "model" and scorer else self._reward(name, columns) for name in self.reward_names]
        tokenizers = [scorer[1] if name == "model" and scorer else None for name in self.reward_names]
        self.prompts = prompts = [dict(row, prompt=row[opts.prompt_column]) for row in train_rows.rows]  # TRL reads "prompt"
        self.prompts_sha256 = hashlib.sha256(json.dumps(prompts, sort_keys=True, default=str).encode()).hexdigest()

        self.hf_config = hf_config = loading.model_config(self.cfg)
        self.tokenizer = loading.tokenizer(self.cfg)
        self.attn = loading.attention(self.cfg.attn_implementation, self.device)
        with sft.quiet():
            model, _ = loading.model(self.cfg, hf_config, attn=self.attn, device=self.device)
        # loading turns the KV cache off for packed SFT rows; generation without one recomputes
        # the whole prefix for every token. The checkpoint's own setting, as TRL loads it
        model.config.use_cache = hf_config.use_cache

        def producer(policy: Any) -> grpo.InProcessRollouts:
            return grpo.InProcessRollouts(
                model=policy, tokenizer=self.tokenizer, rows=prompts, rewards=funcs, reward_names=self.reward_names,
                reward_tokenizers=tokenizers, opts=opts, batch_size=train.batch_size,
                grad_accum=len(self.micro), world_size=ctx.dist.world_size, seed=ctx.seed, use_cpu=self.device.type == "cpu",
                peft_config=loading.lora(self.hf.lora) if self.hf.lora else None,
                checkpointing=self.cfg.gradient_checkpointing or train.activation_checkpointing,
            )

        return model, producer

    def _refuse_unsupported(self) -> None:
        data, train = self.data_cfg, self.train
        if train.compile:
            raise ConfigError("train.compile is not supported by the hf backend; set it to false")
        if data.packing or data.shape != "auto" or data.mask != "auto":
            raise ConfigError('data.packing, data.shape and data.mask are for objective = "sft"; GRPO reads prompts '
                              "and trains on the completions it generates (leave them at their defaults)")
        if self.ctx.loss_terms is not None:
            raise ConfigError('loss-term plugins need token logits, which objective = "grpo" never builds; remove them')
        if data.record_samples:
            raise ConfigError('data.record_samples records the rows objective = "sft" trains; GRPO trains on the completions '
                              "it generates: set data.record_samples = false")
        opts = self.hf.grpo
        if opts.max_staleness:
            unsupported = [what for what, on in (
                ("[hf.lora]", self.hf.lora is not None),
                (f"num_iterations = {opts.num_iterations}", opts.num_iterations != 1),
                (f"{self.ctx.dist.world_size} ranks", self.ctx.dist.world_size > 1),
                (f"steps_per_generation = {opts.steps_per_generation} (not train.grad_accum)",
                 opts.steps_per_generation not in (0, train.grad_accum)),
            ) if on]
            if unsupported:
                raise ConfigError(f"hf.grpo.max_staleness = {opts.max_staleness} generates one batch per step from a "
                                  f"policy copy; it does not support {', '.join(unsupported)}: remove them or set "
                                  "max_staleness = 0")
        world = self.ctx.dist.world_size
        steps_per_generation = self.hf.grpo.steps_per_generation
        if steps_per_generation % world:
            raise ConfigError(f"hf.grpo.steps_per_generation {steps_per_generation} must be a multiple of the {world} "
                              "ranks (each generates its share of the generation batch)")
        if not self.hf.grpo.rewards:
            raise ConfigError('hf.grpo.rewards is empty; name at least one reward: "format", "exact_match", an enabled '
                              'reward plugin or "package.module:function"')

    def _reward_model(self) -> tuple[Any, Any] | None:
        """The "model" reward's (model, tokenizer), safely loaded (``reward_model.py``); None when
        no reward model is named or the backend is built to evaluate (nothing is read then)."""
        if "model" not in self.hf.grpo.rewards or not self.ctx.trains:
            return None
        checked = reward_model.check(self.hf.grpo.reward_model)
        dtype = torch.float32 if self.cfg.dtype == "auto" else getattr(torch, self.cfg.dtype)
        return reward_model.load(checked, dtype=dtype, device=self.device)

    def _reward(self, name: str, columns: list[str]) -> Any:
        """Reward ``name`` as TRL calls it; in a backend built to evaluate, a stand-in (nothing imported)."""
        if not self.ctx.trains:
            return rewards.not_loaded(name)
        opts = self.hf.grpo
        found = rewards.resolve(name, format_pattern=opts.format_pattern, answer_column=opts.answer_column,
                                columns=columns, plugins=self.ctx.rewards)
        return rewards.for_trl(name, found, plugin=name in self.ctx.rewards and name not in rewards.BUILTIN)

    # --- the seam ---------------------------------------------------------------------------------

    def rollout_producer(self) -> grpo.InProcessRollouts | grpo_async.AsyncRollouts | grpo_remote.RemoteRollouts:
        return self.producer

    def train_step(self, step: int) -> StepOutput:
        raise ConfigError('objective = "grpo" trains on rollouts; the kernel calls train_rollout')

    def _loss(self, model: Any, inputs: dict[str, Any], with_logits: bool) -> MicroLoss:
        return MicroLoss(share=self.producer.loss(model, inputs))

    def train_rollout(self, step: int, rollout: Rollout) -> StepOutput:
        micro = self.producer.for_training(step, rollout)
        out = self.stepper.run(micro, self._loss, tokens=rollout.tokens,
                               processed_tokens=sum(int(b["prompt_ids"].numel() + b["completion_ids"].numel())
                                                    for b in micro))
        out.host_metrics = self.producer.step_metrics()
        self.steps_done = step + 1
        return out

    def evaluate(self, step: int) -> dict[str, Evaluation]:
        """Nothing: GRPO has no fixed data to score; its rewards are reported every step."""
        return {}

    def measure(self, steps: int = 2) -> float:
        """Seconds of the training part of a step: forward/backward of the loss on one prepared
        micro-batch (from a dataloader of its own, generated with the RNG saved and put back, and
        the producer's state as it was), times the micro-batches. Generation time is left out."""
        trainer, rng, saved = self.producer.trainer, self.placement.rng_state(), self.producer.loss_side.state()
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        seconds = self.stepper.measure(inputs, self._loss, steps=steps, micro_batches=len(self.micro))
        trainer._step, trainer._buffered_inputs = saved.step, saved.buffered
        trainer.state.num_input_tokens_seen = saved.tokens_seen
        self.producer.step_metrics()  # what the measurement logged is no step's
        self.placement.set_rng_state(rng)
        return seconds

    # --- state ----------------------------------------------------------------------------------

    def stream_settings(self) -> dict[str, Any]:
        """What the stream of prompts, completions and rewards depends on beside the data and
        the model (the kernel's locked keys): a resume that changes any of them is refused, as
        the buffered generation and the prompt order were made under them."""
        train = self.train
        grpo_table = grpo_settings(self.hf.grpo)
        return {"seed": self.ctx.seed, "train.batch_size": train.batch_size, "train.grad_accum": train.grad_accum,
                **grpo_table, "prompts_sha256": self.prompts_sha256}

    def save(self, directory: Path) -> None:
        """The hf checkpoint (weights, optimizer, RNG) and the producer's state (``grpo_state.py``:
        every rank its buffered share of the generation)."""
        super().save(directory)
        dist = self.ctx.dist
        grpo_state.save(directory, self.producer.state(), self.stream_settings(), rank=dist.rank, world_size=dist.world_size)

    def load(self, directory: Path) -> None:
        """The producer's state, checked before anything else is loaded (a refusal costs
        nothing), then the hf checkpoint (which restores the RNG), then the producer."""
        producer = self.producer
        expected = grpo_state.Expected(
            settings=self.stream_settings(), defaults=grpo_settings(GRPOConfig()), batch_size=self.train.batch_size,
            micro_batches=producer.trainer.args.steps_per_generation,
            max_completion_length=self.hf.grpo.max_completion_length,
            vocab_size=self.base.get_input_embeddings().num_embeddings,
            passes=len(producer.dataloader()), shuffles=producer.generator() is not None,
            rank=self.ctx.dist.rank, world_size=self.ctx.dist.world_size,
        )
        saved = grpo_state.load(directory, expected, self.device)
        super().load(directory)
        self.producer.restore(saved)

    def close(self) -> None:
        super().close()
        if getattr(self, "producer", None) is not None:
            self.producer.close()


def grpo_settings(opts: GRPOConfig) -> dict[str, Any]:
    """``[hf.grpo]`` as the stream's settings (keys ``hf.grpo.NAME``)."""
    return {f"hf.grpo.{key}": list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(opts).items() if key not in NOT_STREAM}


#: where the batches are generated, not what they hold: free to change across a resume
NOT_STREAM = ("rollout_workers",)
