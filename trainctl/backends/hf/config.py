"""The ``hf`` backend's tables: ``[model]``, ``[data]`` and ``[hf]`` (with ``[hf.lora]`` and
``[hf.dpo]``).
Torch-free: ``config show``, ``backends`` and ``--help`` import this without transformers.

Locked keys (refused on resume if changed) are the ones that decide which tokens a step trains
on: the model, tokenizer and chat template, the data files and split, the shape and mask, the
packing and the maximum length. A resume that changes ``[hf] objective`` is refused when the
checkpoint loads (``weights.py``), ``--force`` or not: the step count of one objective means nothing
to the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainctl.kernel.errors import ConfigError
from trainctl.kernel.schema import locked, ranged

Shape = Literal["auto", "text", "messages", "prompt_completion"]
Mask = Literal["auto", "trl", "none", "assistant_only", "completion_only"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """``[model]``: a causal LM from the Hugging Face hub or a local directory."""

    name_or_path: str = locked("")  # hub id (e.g. "Qwen/Qwen3-0.6B") or a directory
    revision: str = locked("")  # hub revision; "" = the default branch
    tokenizer: str = locked("")  # "" = the model's own
    chat_template: str = locked("")  # "" = the tokenizer's; else a Jinja string or a .jinja file
    max_length: int = locked(1024)  # tokens per row (truncation) or per packed row
    # auto: float32 weights (the optimizer's master copy, as TRL loads them); the compute dtype is
    # train.dtype (bf16 autocast on CUDA). float16/bfloat16 load the weights in that dtype.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto: flash_attention_2 on CUDA when the flash_attn package imports, else sdpa
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    freeze_vision: bool = True  # image-text-to-text checkpoints: train the language model only

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ValueError("max_length must be at least 8 tokens")
        allowed = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
        if self.attn_implementation not in allowed and not self.attn_implementation.startswith("kernels-"):
            raise ValueError(f"attn_implementation must be one of {', '.join(allowed)}, got {self.attn_implementation!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """``[data]``: rows to fine-tune on, checked before the model loads.

    ``train``/``val``: a ``.jsonl``/``.json`` file, a ``.parquet`` file, a directory written by
    ``datasets.save_to_disk``, or a hub dataset id loaded with ``datasets.load_dataset``. Without ``val``, a ``val_fraction`` of ``train`` is held out, chosen
    by ``split_seed`` alone (not the run's seed), so the split never moves between runs and resumes.
    """

    train: str = locked("")  # a file, a saved-datasets directory or a hub dataset id (trl-lib/Capybara)
    val: str = locked("")
    split: str = locked("train")  # the split of a hub dataset id in train
    val_split: str = locked("test")  # the split of a hub dataset id in val
    subset: str = locked("")  # a hub dataset's configuration (load_dataset's name); "" = its default
    # with a datasets builder name in train / val ("json", "parquet", "csv", "text"): its files
    # (paths or globs), as load_dataset(builder, data_files=...)
    data_files: tuple[str, ...] = locked(())
    val_files: tuple[str, ...] = locked(())
    val_fraction: float = locked(0.05)  # when val = ""; 0 = no validation split
    split_seed: int = locked(0)
    shape: Shape = locked("auto")  # auto: from the columns (messages | prompt+completion | text)
    text_field: str = locked("text")  # the column of plain-text rows
    eos_token: str = locked("")  # appended to text rows and completions; "" = the tokenizer's eos
    # auto: assistant_only for messages, completion_only for prompt/completion, none for text;
    # trl: SFTConfig's defaults, none for messages and text, completion_only for prompt/completion
    mask: Mask = locked("auto")
    packing: Literal["bfd", "wrapped"] | bool = locked(False)  # bfd: padding-free, documents kept apart
    shuffle: bool = locked(True)  # a fresh seeded order every epoch; false: file order
    # read data.train as a stream (files too big to load: stream.py): rows in file order, steps
    # resume from the position saved in the checkpoint; data.shuffle then reorders the files per epoch
    streaming: bool = locked(False)
    # how a shuffled epoch is ordered: "trainctl" a NumPy permutation of (seed, epoch); "trl" the
    # Trainer's (accelerate's SeedableRandomSampler: torch.randperm seeded with order_seed + epoch)
    order: Literal["trainctl", "trl"] = locked("trainctl")
    order_seed: int = locked(-1)  # the order's seed (TRL's data_seed); -1 = the run's seed
    # > 0: the run is this many passes over the prepared training rows (TRL's num_train_epochs):
    # the backend derives the steps from them and the global batch, replacing train.max_steps
    epochs: float = 0.0
    # how a step crosses an epoch's end: "continue" runs on into the next epoch (every step full);
    # "short_step" ends each epoch with a shorter step, as transformers' Trainer (and so TRL) does
    epoch_end: Literal["continue", "short_step"] = locked("continue")
    # a per-rank JSON line per step in the run directory: which training rows the step trained on
    # (their ids, epochs and token counts: row_ids.py); objective = "sft" only
    record_samples: bool = False
    # --- validation rules (errors stop the run before the model loads)
    require_reasoning: bool = False  # every assistant turn/completion holds a closed reasoning block
    reasoning_tags: tuple[str, str] = ("<think>", "</think>")
    max_row_tokens: int = 0  # rows longer than this are errors; 0 = only warn above model.max_length
    report_rows: int = 5  # rows named per problem in the report

    def __post_init__(self) -> None:
        if self.packing is True:
            raise ValueError('packing must be false, "bfd" or "wrapped" (bfd keeps documents apart)')
        if not 0 <= self.epochs < 1e6:  # not NaN either
            raise ValueError("epochs must be 0 (train.max_steps decides) or a positive number of passes")
        if not 0 <= self.val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")
        if self.max_row_tokens < 0 or self.report_rows < 1:
            raise ValueError("max_row_tokens must be 0 or more and report_rows at least 1")
        if len(self.reasoning_tags) != 2 or not all(self.reasoning_tags):
            raise ValueError('reasoning_tags must be two non-empty strings, e.g. ["<think>", "</think>"]')


@dataclass(frozen=True, kw_only=True, slots=True)
class LoraConfig:
    """``[hf.lora]``: train low-rank adapters (peft) instead of the full model. Present = on."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)  # module names, or "all-linear" (lm_head excluded)

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ValueError("r and alpha must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if "lm_head" in self.target_modules:
            raise ValueError("lm_head cannot take an adapter: TRL's fused loss reads lm_head.weight directly")


#: TRL's DPO loss types this backend computes (``DPOTrainer._compute_loss``'s formulas).
LossType = Literal["sigmoid", "hinge", "ipo", "robust"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DPOConfig:
    """``[hf.dpo]``: preference optimisation (``[hf] objective = "dpo"``), named as TRL's ``DPOConfig``.

    ``reference`` is what the log-ratios are taken against: ``copy`` a frozen copy of the starting
    weights; ``adapters_off`` the base model with the LoRA adapter disabled (no second copy; needs
    ``[hf.lora]``); ``precomputed`` reference log-probs computed once from the starting weights before
    the first step and cached in the run directory (a resume reads them back); ``auto`` TRL's
    choice (``adapters_off`` with LoRA, else ``copy``). ``ref_model``, TRL's ``ref_model``: a separate
    reference model (a local ``save_pretrained`` directory) for ``copy`` and ``precomputed``, instead
    of the starting weights. ``model.max_length`` is TRL's ``max_length``
    (prompt + completion, cut at the end; pairs whose prompt alone fills it are dropped, as TRL does).
    """

    beta: float = ranged(0.1, gt=0)
    loss_type: LossType = "sigmoid"
    label_smoothing: float = ranged(0.0, ge=0, lt=0.5)  # robust only: the flipped-label rate
    reference: Literal["auto", "copy", "adapters_off", "precomputed"] = "auto"
    ref_model: str = ""  # a separate reference model's directory; empty: the starting weights
    # a pair whose prompt alone fills model.max_length: "error" stops before the model loads;
    # "drop" leaves it out, as TRL does, and the plan counts what was dropped
    too_long: Literal["error", "drop"] = "error"

    def __post_init__(self) -> None:
        if self.ref_model and self.reference == "adapters_off":
            raise ValueError('ref_model names a separate reference, while reference = "adapters_off" uses the base model '
                             'with the adapter off; drop ref_model or set reference = "copy" or "precomputed"')
        if self.label_smoothing and self.loss_type != "robust":
            raise ValueError(f"label_smoothing is used by loss_type = \"robust\" only (TRL ignores it for {self.loss_type!r}); "
                             "set loss_type = \"robust\" or label_smoothing = 0")


def resolve_reference(reference: str, lora: bool, separate: bool = False) -> str:
    """What ``hf.dpo.reference`` means for this run: ``auto`` is TRL's choice (a separate reference
    model, ``separate``, is always held as a copy)."""
    if reference == "auto":
        return "adapters_off" if lora and not separate else "copy"
    if reference == "adapters_off" and not lora:
        raise ConfigError('hf.dpo.reference = "adapters_off" needs a [hf.lora] adapter to switch off; add [hf.lora] or use "copy"')
    return reference


#: TRL's GRPO loss types this backend runs (``GRPOTrainer._compute_loss``, called as it is).
GRPOLossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]


def worker_address(address: str) -> tuple[str, int]:
    """(host, port) of a ``rollout_workers`` entry; ValueError naming the entry if it is not
    ``host:port`` with a port in 1..65535."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() or c in "/@?#" for c in host):
        raise ValueError(f"rollout_workers entry {address!r} is not host:port (e.g. \"127.0.0.1:8600\", the "
                         "address `trainctl rollout-worker --port` serves on)")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, kw_only=True, slots=True)
class GRPOConfig:
    """``[hf.grpo]``: online RL (``[hf] objective = "grpo"``), named and defaulted as TRL's
    ``GRPOConfig``. Each step's completions are generated by the policy itself (transformers'
    ``generate``), ``num_generations`` per prompt, scored by ``rewards``: built-in names
    (``format``: 1.0 when the completion matches ``format_pattern``; ``exact_match``: 1.0 when
    it equals the row's ``answer_column``, stripped; ``model``: the score of the
    sequence-classification checkpoint in ``reward_model``, ``reward_model.py``) or ``"package.module:function"``, a plain
    function ``(prompts, completions, rows) -> one float per completion``, imported, never
    executed from text. ``train.batch_size`` is TRL's ``per_device_train_batch_size``
    (completions per micro-batch); ``epsilon_high = 0`` means ``epsilon`` (TRL's None);
    ``steps_per_generation = 0`` means ``train.grad_accum``. Prompts are the data's
    ``prompt_column`` (text or a conversation)."""

    rewards: tuple[str, ...] = ()
    reward_weights: tuple[float, ...] = ()  # empty: 1.0 each
    num_generations: int = 8
    max_completion_length: int = 512
    temperature: float = ranged(1.0, gt=0)
    top_p: float = ranged(1.0, gt=0, le=1)
    top_k: int = ranged(0, ge=0)  # 0: off
    beta: float = ranged(0.0, ge=0)  # KL coefficient; 0: no reference model is loaded
    epsilon: float = ranged(0.2, gt=0)
    epsilon_high: float = ranged(0.0, ge=0)
    num_iterations: int = ranged(1, ge=1)
    steps_per_generation: int = ranged(0, ge=0)
    loss_type: GRPOLossType = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = False
    importance_sampling_level: Literal["token", "sequence"] = "token"
    prompt_column: str = "prompt"
    format_pattern: str = ""  # the "format" reward's regular expression (re.fullmatch, DOTALL)
    answer_column: str = "answer"  # the "exact_match" reward's column
    # the "model" reward's sequence-classification folder (num_labels = 1, safetensors: reward_model.py)
    reward_model: str = ""
    # asynchronous generation (grpo_async.py): a generator thread with its own copy of the policy
    # makes batch n from weights of version >= n - max_staleness while the trainer trains; 0: synchronous
    max_staleness: int = ranged(0, ge=0)
    # TRL's vllm_importance_sampling_*, applied to batches older than the policy (behaviour: the
    # generator's copy); clip_min 0 is TRL's None (a ratio is never below 0)
    importance_sampling_correction: bool = True
    importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "sequence_mask"
    importance_sampling_clip_max: float = ranged(3.0, gt=0)
    importance_sampling_clip_min: float = ranged(0.0, ge=0)
    # "host:port" of `trainctl rollout-worker` processes (grpo_remote.py) that generate in place
    # of the thread, batch n on worker n mod len; empty: the thread. Needs max_staleness >= 1
    rollout_workers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for address in self.rollout_workers:
            worker_address(address)
        if self.rollout_workers and self.max_staleness < 1:
            raise ValueError("rollout_workers needs max_staleness >= 1 (the workers generate while the trainer trains); "
                             "set max_staleness = 1 or remove rollout_workers")
        if len(set(self.rollout_workers)) != len(self.rollout_workers):
            raise ValueError("rollout_workers names a worker twice; list each host:port once")
        if ("model" in self.rewards) != bool(self.reward_model):
            raise ValueError('rewards has "model" but reward_model is empty; set reward_model to the folder of a '
                             'sequence-classification checkpoint' if self.reward_model == "" else
                             f'reward_model is {self.reward_model!r} but rewards has no "model"; add "model" to '
                             'rewards (weighed by reward_weights) or drop reward_model')
        if self.num_generations < 2:
            raise ValueError("num_generations must be at least 2: advantages compare completions of the same prompt")
        if self.max_completion_length < 1:
            raise ValueError("max_completion_length must be at least 1 token")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} weights for {len(self.rewards)} rewards; "
                             "give one per reward or none")


@dataclass(frozen=True, kw_only=True, slots=True)
class HFConfig:
    """``[hf]``: what is specific to transformers/TRL. A ``[hf.lora]`` table turns LoRA on; a
    change of its shape across a resume is refused when the adapter is loaded. ``objective``:
    ``sft`` (TRL's SFT loss on the rows), ``dpo`` (preference pairs, ``[hf.dpo]``) or ``grpo``
    (online RL on prompts, ``[hf.grpo]``)."""

    lora: LoraConfig | None = None
    objective: Literal["sft", "dpo", "grpo"] = "sft"
    dpo: DPOConfig = DPOConfig()
    grpo: GRPOConfig = GRPOConfig()
    # NEFTune (TRL's neftune_noise_alpha): uniform noise of alpha / sqrt(length x hidden) added to
    # the input embeddings while training (transformers' hook); 0 = off
    neftune_noise_alpha: float = ranged(0.0, ge=0)
