"""Names that other trainers give trainctl's keys: TRL / transformers' ``TrainingArguments`` (as
``trl sft --config`` files spell them). An unknown key with one of these names is answered with
trainctl's key, whichever table it was written in. Torch-free. A test checks it against
``trainctl config import-trl``'s own table (``backends/hf/trl_config.py``)."""

from __future__ import annotations

TRL: dict[str, str] = {
    "learning_rate": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "adam_beta1": "optim.beta1",
    "adam_beta2": "optim.beta2",
    "adam_epsilon": "optim.eps",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "max_grad_norm": "train.grad_clip",
    "output_dir": "train.out_dir",
    "run_name": "train.run_name",
    "logging_steps": "train.log_interval",
    "eval_steps": "train.eval_interval",
    "save_steps": "train.save_interval",
    "num_train_epochs": "data.epochs",
    "lr_scheduler_type": "plugin.lr.schedule",
    "warmup_steps": "plugin.lr.warmup_steps",
    "save_total_limit": "plugin.checkpoint.keep_last",
    "model_name_or_path": "model.name_or_path",
    "max_seq_length": "model.max_length",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "chat_template_path": "model.chat_template",
    "dataset_name": "data.train",
    "dataset_train_split": "data.split",
    "dataset_test_split": "data.val_split",
    "dataset_config": "data.subset",
    "dataset_text_field": "data.text_field",
    "data_seed": "data.order_seed",
    "neftune_noise_alpha": "hf.neftune_noise_alpha",
    "lora_r": "hf.lora.r",
    "lora_alpha": "hf.lora.alpha",
    "lora_dropout": "hf.lora.dropout",
    "lora_target_modules": "hf.lora.target_modules",
}


def hint(word: str, where: str) -> str:
    """`` (TRL's name; trainctl's is optim.lr)`` for a TRL name, else ``""``. ``where`` is the
    dotted key as written (``optim.learning_rate``), to say nothing when it is already right."""
    key = TRL.get(word)
    if key is None or key == where:
        return ""
    return f" (TRL's name; trainctl's key is {key})"
