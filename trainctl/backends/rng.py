"""The torch RNG state (dropout masks) in a checkpoint, one file per rank, for every backend:
ranks draw different masks, and a rank that the checkpoint has no file for (it was written by
fewer ranks) starts a fresh stream seeded by ``seed + rank``."""

from __future__ import annotations

from pathlib import Path

import torch

from trainctl.kernel.safe_load import load_plain

SINGLE = "rng.pt"  # one-file layout of earlier checkpoints, still read for rank 0


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def save_rng(directory: Path, rank: int, device: torch.device) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    torch.save(rng, directory / rng_file(rank))


def load_rng(directory: Path, rank: int, device: torch.device, seed: int) -> None:
    candidates = [directory / rng_file(rank)] + ([directory / SINGLE] if rank == 0 else [])
    found = [p for p in candidates if p.exists()]
    if not found:
        torch.manual_seed(seed + rank)
        return
    rng = load_plain(found[0], "cpu")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
