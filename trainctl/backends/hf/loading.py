"""Loading what a run is made of: the model's config (first, so a missing model is one clear
error), the tokenizer and its chat template, the model itself (causal LM, or image-text-to-text
with the vision side frozen), and the LoRA adapter config.

Nothing here is ever executed from the hub: ``trust_remote_code`` stays off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainctl.backends.hf.config import LoraConfig, ModelConfig
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.safe_load import UNREADABLE_WEIGHTS, weights_refused


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def model_config(cfg: ModelConfig) -> Any:
    """The checkpoint's ``config.json``; a missing model or an offline cache miss is one line."""
    from huggingface_hub import constants
    from transformers import AutoConfig

    name = cfg.name_or_path
    if not name:
        raise ConfigError("model.name_or_path is not set; give a hub id (e.g. Qwen/Qwen3-0.6B) or a model directory")
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model.name_or_path {name}: no such directory; check the path or give a hub id")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name_or_path {name} has no config.json; point at a save_pretrained directory")
    try:
        return AutoConfig.from_pretrained(name, revision=cfg.revision or None)
    except (OSError, ValueError) as exc:
        if constants.HF_HUB_OFFLINE:
            raise ConfigError(
                f"model {name!r} is not a local directory and is not in the Hugging Face cache (offline: "
                f"HF_HUB_OFFLINE is set); download it first (hf download {name}) or set model.name_or_path to a directory"
            ) from None
        raise ConfigError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from None


def tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer, with ``model.chat_template`` (a Jinja string or a file) in place."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision or None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of {name!r} ({str(exc).splitlines()[0]}); set model.tokenizer to a directory or hub id") from None
    if cfg.chat_template:
        template = cfg.chat_template
        if "{" not in template:  # a template has Jinja tags; anything else names a file
            path = Path(template).expanduser()
            if not path.is_file():
                raise ConfigError(f"model.chat_template {template}: no such file (give a .jinja file or the template text)")
            template = path.read_text(encoding="utf-8")
        tok.chat_template = template
    if tok.eos_token is None:
        raise ConfigError(f"the tokenizer of {name!r} has no eos token; set data.eos_token to its end-of-turn token")
    return tok


def attention(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def is_vision_language(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return getattr(config, "vision_config", None) is not None or (
        config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and config.get_text_config() is not config
    )


def model(cfg: ModelConfig, config: Any, *, attn: str, device: torch.device) -> tuple[Any, int]:
    """The model on ``device`` in training mode, and how many parameters were frozen."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    vision = is_vision_language(config)
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    dtype = torch.float32 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    try:
        m = auto.from_pretrained(cfg.name_or_path, revision=cfg.revision or None, dtype=dtype, attn_implementation=attn)
    except (ImportError, ValueError) as exc:  # e.g. flash_attention_2 asked for but not installed
        raise ConfigError(f"cannot load {cfg.name_or_path!r} with attn_implementation={attn!r}: {str(exc).splitlines()[0]}") from None
    except UNREADABLE_WEIGHTS as exc:  # weights that safetensors refuses (a header that lies, a truncated file)
        raise weights_refused(Path(cfg.name_or_path), exc) from None
    frozen = freeze_vision(m) if vision and cfg.freeze_vision else 0
    if cfg.gradient_checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.config.use_cache = False  # a cache object turns packed-sequence detection off (documents would leak)
    return m.to(device).train(), frozen


def freeze_vision(m: Any) -> int:
    """Freeze the vision encoder and projector: text-only rows give them no gradient."""
    inner = getattr(m, "model", m)
    parts = [m.get_encoder(modality="image")] + [
        getattr(inner, name) for name in ("multi_modal_projector", "mm_projector") if hasattr(inner, name)
    ]
    frozen = 0
    for part in parts:
        if part is m or part is inner:  # no vision tower found: freezing it would freeze everything
            raise ConfigError(f"{type(m).__name__}: cannot find its vision tower to freeze; set model.freeze_vision = false")
        for p in part.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen


def lora(cfg: LoraConfig) -> Any:
    try:
        from peft import LoraConfig as PeftLora
    except ImportError:
        raise ConfigError("[hf.lora] needs peft: pip install 'trainctl[hf]'") from None

    targets: Any = cfg.target_modules[0] if cfg.target_modules == ("all-linear",) else list(cfg.target_modules)
    return PeftLora(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                    task_type="CAUSAL_LM", target_modules=targets)
