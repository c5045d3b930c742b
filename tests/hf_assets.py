"""Tiny offline Hugging Face assets for tests and benchmarks: a byte-level BPE tokenizer trained on
tiny-shakespeare with a ChatML template (assistant turns and their end-of-turn token inside
``{% generation %}``), a tiny random Llama or Qwen3 saved with ``save_pretrained``, and JSONL rows
in the three shapes (text, messages, prompt/completion) made from the corpus' speeches.

Plain functions (no pytest): ``tests/hf_fixtures.py`` builds them once per session, ``bench/``
reuses them. transformers is imported inside the functions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]  # ids 0..3

CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def corpus() -> str:
    from trainctl.backends.gpt.data import embedded_text

    return embedded_text()


def speeches(limit: int = 400) -> list[tuple[str, str]]:
    """(speaker, speech) pairs from the start of the corpus."""
    out = []
    for block in corpus().split("\n\n"):
        speaker, _, speech = block.strip().partition(":\n")
        if speech and len(speech) < 400:
            out.append((speaker, speech))
        if len(out) >= limit:
            break
    return out


def build_tokenizer(out: Path, vocab_size: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus()], trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token=None,
        extra_special_tokens=["<|im_start|>", "<|endoftext|>"], model_max_length=512, padding_side="right",
    )
    hf.chat_template = CHATML
    hf.save_pretrained(out)


def build_plain_tokenizer(out: Path, tokenizer_dir: Path) -> None:
    """The same tokenizer with no chat template, as a base model's tokenizer usually is."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    tok.save_pretrained(out)


def build_model(out: Path, tokenizer_dir: Path, arch: str = "llama", seed: int = 0) -> None:
    """A 2-layer, 64-wide random model (untied lm_head) plus its tokenizer, in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen3Config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                 tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                 bos_token_id=None)
    config = LlamaConfig(**shape) if arch == "llama" else Qwen3Config(head_dim=16, **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_vision_model(out: Path, tokenizer_dir: Path) -> None:
    """A tiny random Qwen3-VL (vision tower + language model) with the text tokenizer."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen3VLConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True},
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503,
    )
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config, dtype=torch.float32).save_pretrained(out)
    tok.save_pretrained(out)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def grpo_assets(root: Path, tokenizer_dir: Path, prompts: int) -> tuple[Path, Path]:
    """(a tiny Qwen3 in ``root/qwen3``, ``root/prompts.jsonl``): GRPO prompts, the first 40
    characters of ``prompts`` speeches, each with its ``speaker``."""
    build_model(root / "qwen3", tokenizer_dir, arch="qwen3")
    rows = [{"prompt": speech[:40], "speaker": speaker} for speaker, speech in speeches(prompts)]
    return root / "qwen3", write_jsonl(root / "prompts.jsonl", rows)


def text_rows(n: int = 64) -> list[dict]:
    return [{"text": f"{speaker}:\n{speech}"} for speaker, speech in speeches()[:n]]


def message_rows(n: int = 64, seed: int = 0) -> list[dict]:
    pairs = speeches()
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        (_, asked), (_, answer) = pairs[i % len(pairs)], pairs[(i + 1) % len(pairs)]
        messages = [{"role": "user", "content": asked}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": "Speak as in the play."})
        rows.append({"messages": messages})
    return rows


def prompt_completion_rows(n: int = 64) -> list[dict]:
    return [{"prompt": f"{speaker}:\n", "completion": speech} for speaker, speech in speeches()[:n]]


def build_reward_model(out: Path, tokenizer_dir: Path, seed: int = 1) -> None:
    """A 2-layer, 64-wide random LlamaForSequenceClassification (num_labels = 1: a reward model)
    with the text tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512, num_labels=1,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
