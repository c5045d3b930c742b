"""The ``hf`` backend: Hugging Face transformers models fine-tuned with TRL's SFT data pipeline
and loss, under the kernel's loop (see ``backend.py`` for why not ``SFTTrainer.train()``).

``config.py`` (torch-free tables), ``rows.py`` (reading and splitting), ``validate.py`` (the data
check), ``loading.py`` (model, tokenizer, LoRA), ``sft.py`` (TRL as a library, batch order),
``update.py`` (skipping non-finite updates on the device), ``weights.py`` (checkpoint files),
``inference.py`` (generate, layer norms), ``epochs.py`` (the rows of each step, epochs),
``plan.py`` (what the plan says), ``sample.py`` (a checkpoint for ``trainctl sample``),
``trl_config.py`` (``config import-trl``), ``backend.py`` (the Backend). ``[hf] objective = "dpo"``:
``dpo.py`` (TRL's DPOTrainer as a library, the reference, cached reference log-probs),
``dpo_loss.py`` (TRL's DPO losses and reward metrics), ``dpo_backend.py`` (the Backend for pairs).
"""
