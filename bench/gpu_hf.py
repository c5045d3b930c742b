"""Step 2 of ``bench/gpu.sh``: the ``hf`` backend on a randomly initialised Qwen3-0.6B-shaped
model at sequence 4096 with BFD packing: tokens/s and peak GPU memory.

    python bench/gpu_hf.py [--smoke] [--results DIR] [--work DIR]

Everything is built here, offline: a byte-level BPE tokenizer trained with ``tokenizers`` on the
embedded tiny-shakespeare, a ``Qwen3Config`` with Qwen3-0.6B's dimensions saved with random
weights (``save_pretrained``), and text rows of the corpus (documents of ~1,000 tokens, about
four to a packed row). The run itself is the real CLI, called in this process
(``trainctl.cli.main``) so that ``torch.cuda.max_memory_allocated()`` afterwards is the run's
peak: events carry no memory.
"""

from __future__ import annotations

import gc
import json
import resource
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_common import (  # noqa: E402
    arguments, cli_env, device_name, peak_tflops, rates, read_events, report, run_end,
)

# Qwen3-0.6B's config.json (hub: Qwen/Qwen3-0.6B), less the tokenizer-bound ids
QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960,
                 rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=512)



@dataclass(frozen=True)
class Sizes:
    shape: dict  # the Qwen3Config dimensions
    tokenizer_vocab: int  # of the BPE trained here (the model's embedding stays shape["vocab_size"])
    doc_chars: int  # characters per text row: ~1,000 tokens on the GPU, about four to a packed row
    sequence: int  # model.max_length: tokens per packed row
    batch: int  # packed rows per micro-batch
    overrides: tuple[str, ...]
    warmup_intervals: int = 1  # logged intervals skipped before measuring


GPU = Sizes(QWEN3_06B, 4096, 3000, 4096, 4, ("train.device=cuda", "train.dtype=bfloat16", "train.grad_accum=2",
                                              "train.max_steps=20", "train.log_interval=5"))
SMOKE = Sizes(TINY, 512, 200, 256, 2, ("train.device=cpu", "train.dtype=float32", "train.threads=1", "train.grad_accum=2",
                                       "train.max_steps=6", "train.log_interval=2"))
SPECIALS = ["<|endoftext|>", "<|pad|>"]


def qwen3_config(shape: dict, tokenizer) -> object:
    from transformers import Qwen3Config

    return Qwen3Config(**shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=None)


def build_tokenizer(out: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trainctl.backends.gpt.data import embedded_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([embedded_text()], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                 bos_token=None, unk_token=None, padding_side="right")
    hf.save_pretrained(out)
    return hf


def build_model(out: Path, shape: dict, vocab_size: int) -> dict:
    """Tokenizer and random Qwen3 in ``out`` (on the GPU when there is one: initialising 0.6B
    parameters is seconds there, much longer on the host). Returns its parameter counts."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(out, vocab_size)
    config = qwen3_config(shape, tokenizer)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    counts = {"params": sum(p.numel() for p in model.parameters()),
              "non_embedding_params": sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)}
    del model
    return counts


def write_rows(path: Path, chars: int) -> int:
    """Text rows of about ``chars`` characters, cut at speech boundaries."""
    from trainctl.backends.gpt.data import embedded_text

    rows, current = [], ""
    for speech in embedded_text().split("\n\n"):
        current = f"{current}\n\n{speech}" if current else speech
        if len(current) >= chars:
            rows.append(current)
            current = ""
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    return len(rows)


def run_cli(args: list[str]) -> int:
    """``trainctl ARGS`` in this process, with the subprocess' offline environment."""
    import os

    from trainctl.cli import main

    os.environ.update({k: v for k, v in cli_env().items() if k.endswith("OFFLINE") or k == "CI"})
    try:
        main(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def main() -> int:
    ap = arguments(__doc__)
    ap.add_argument("--batch", type=int, default=None, help="packed rows per micro-batch (default: 4 on a GPU, 2 in --smoke)")
    ap.add_argument("--timeout", type=float, default=0, help="seconds for the whole step (0: no limit)")
    args = ap.parse_args()
    if args.timeout > 0:  # a timed-out step still writes its result (gpu.sh kills it 10 s later)
        signal.signal(signal.SIGALRM, _timed_out)
        signal.alarm(max(int(args.timeout), 1))
    name = "hf-qwen3"
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = SMOKE if args.smoke else GPU
    batch = args.batch if args.batch is not None else sizes.batch
    gpu = device_name()
    peak = peak_tflops(gpu)
    out, model_dir, rows_file = work / name, work / "qwen3-random", work / "rows.jsonl"
    result: dict = {"device": gpu, "smoke": args.smoke, "peak_tflops": peak, "sequence": sizes.sequence, "packing": "bfd",
                    "batch_size": batch, "shape": {k: v for k, v in sizes.shape.items() if k != "rope_parameters"}}
    argv = ["run", "--backend", "hf", "--out", str(out), "--resume", "never", "--yes"]
    try:
        import torch

        result |= build_model(model_dir, sizes.shape, sizes.tokenizer_vocab)
        result["rows"] = write_rows(rows_file, sizes.doc_chars)
        overrides = [
            *sizes.overrides, f"train.batch_size={batch}", f"model.name_or_path={json.dumps(str(model_dir))}",
            f"model.max_length={sizes.sequence}", f"data.train={json.dumps(str(rows_file))}", 'data.packing="bfd"',
            "data.val_fraction=0.02", "train.eval_interval=0", "train.eval_steps=1", "train.save_interval=0",
            "optim.lr=1e-4", "plugin.lr.warmup_steps=2", 'plugins=["lr","controller","status","console","jsonl"]',
        ] + ([f"train.peak_tflops={peak}"] if peak else [])
        argv += [a for item in overrides for a in ("--set", item)]
        from trainctl.backends.hf.loading import attention

        result["attention"] = attention("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        gc.collect()  # the builder's model holds cycles: free it before the run is measured
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        code = run_cli(argv)
        events = read_events(out)
        end = run_end(events)
        if code != 0 or end["status"] != "completed":
            raise RuntimeError(f"trainctl run exited {code} ({end['status']}: {end.get('reason', '')})")
        start = next(e for e in events if e["event"] == "run_start")
        result |= {"status": "ok", "tokens_per_step": start["tokens_per_step"], **rates(events, sizes.warmup_intervals)}
        if torch.cuda.is_available():
            result |= {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                       "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                       "memory_measure": "torch.cuda.max_memory_allocated over the run"}
        else:  # Linux reports KiB
            result |= {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                       "memory_measure": "max RSS of the whole process (assets included): no GPU"}
    except Exception as exc:  # the step fails, the script does not: gpu.sh goes on
        result |= {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    result["command"] = " ".join(["python -m trainctl", *argv])
    return report(args.results, name, result, line)


def _timed_out(signum: int, frame: object) -> None:
    raise TimeoutError("the step ran out of time (--timeout)")


def line(r: dict) -> str:
    if r["status"] != "ok":
        return f"FAILED: {r['reason']}"
    mfu = f", MFU {r['mfu']:.1%} (6N FLOPs/token, attention not counted)" if r["mfu"] is not None else ""
    return (f"{r['tokens_per_s']:,.0f} trained tokens/s{mfu}, peak memory {r['peak_memory_gib']:.2f} GiB, {r['attention']}, "
            f"{r['step_time_s']:.3f} s/step at sequence {r['sequence']} packed ({r['params'] / 1e6:.1f}M params) on {r['device']}")


if __name__ == "__main__":
    sys.exit(main())
