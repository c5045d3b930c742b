"""What the hf plan says about the data and the optimizer: counts after TRL's preparation (rows
kept and dropped, epochs covered, trained tokens), and every default that differs from TRL's
(``SFTConfig``) named where it applies, so a TRL user sees them before the first step."""

from __future__ import annotations

from typing import Any

#: TRL's defaults (``SFTConfig`` / ``TrainingArguments``) that trainctl's differ from.
TRL_BETA2 = 0.999
TRL_WEIGHT_DECAY = 0.0


def trained_tokens(ds: Any) -> int:
    """Label positions the loss scores in one pass over ``ds`` (prepared rows): labels that are
    not -100, less each row's first (the loss predicts token t+1 from t). Read with Arrow on the
    host at setup, never per step; with padding-free packing it is exact up to one token per batch."""
    import pyarrow.compute as pc

    labels = ds.select_columns(["labels"]).with_format("arrow")[:]["labels"]  # respects the rows TRL filtered out
    scored = pc.sum(pc.not_equal(pc.list_flatten(labels), -100)).as_py() or 0
    first = pc.sum(pc.not_equal(pc.list_element(labels, 0), -100)).as_py() or 0
    return int(scored - first)


def data_details(backend: Any, *, n_train: int, n_val: int, packing: str) -> dict[str, str]:
    """The ``data``, ``run length`` and ``trained tokens`` lines of the plan."""
    data, layout, sft = backend.data_cfg, backend.layout, backend.sft
    kept = len(sft.train)
    if data.packing:
        prepared = f"{n_train} train rows packed ({packing}) into {kept} rows of up to {backend.cfg.max_length} tokens"
    else:
        dropped = n_train - kept
        prepared = f"{n_train} train rows, {kept} kept" + (
            f", {dropped} dropped by TRL (nothing left to train after truncation to max_length)" if dropped else "")
    if data.val:
        val = f"{n_val} val rows from data.val"
    elif n_val:
        val = (f"{n_val} val rows held out of data.train (data.val_fraction {data.val_fraction:g}; trainctl's "
               "default is 0.05, TRL holds none out: set 0 to train on every row)")
    else:
        val = "no validation rows"
    per_epoch = trained_tokens(sft.train)
    covered = layout.epochs(backend.max_steps)
    source = f"data.epochs = {data.epochs:g}" if data.epochs else "train.max_steps"
    end = ("each epoch ends with a shorter step, as TRL's" if layout.short_step
           else "steps run over an epoch's end into the next (data.epoch_end = \"continue\")")
    return {
        "data": f"{backend.shape}: {prepared}; {val}; max_length {backend.cfg.max_length}",
        "run length": (f"{backend.max_steps} steps ({source}) x {layout.rows_per_step} rows = {covered:.2f} epochs "
                       f"of {kept} rows; {end}; {order_line(sft, layout.shuffle)}"),
        "trained tokens": f"{per_epoch:,} per epoch, ~{round(per_epoch * covered):,} in the run",
    }


def stream_details(backend: Any, *, n_val: int) -> dict[str, str]:
    """The ``data`` and ``run length`` lines of a streamed run (``data.streaming``)."""
    data, src, train = backend.data_cfg, backend.source, backend.train
    packing = f"packed ({data.packing}) as they stream, " if data.packing else ""
    val = f"{n_val} val rows from data.val" if data.val else "no validation rows"
    order = (f"the {len(src.files)} files reordered every epoch (seed, epoch), rows in file order within each"
             if data.shuffle and len(src.files) > 1 else "rows in file order")
    return {
        "data": (f"{backend.shape}: streamed from {len(src.files)} {src.builder} file(s) of {src.label}, {packing}"
                 f"prepared by TRL as they are read; {val}; max_length {backend.cfg.max_length}"),
        "run length": (f"{backend.max_steps} steps (train.max_steps) x {backend.layout.rows_per_step} rows, passes over the "
                       f"stream as it ends; {order}; the position is saved in every checkpoint; evaluation scores the "
                       f"stream's first {len(backend.sft.train)} rows as training rows"),
    }


def order_line(rows: Any, shuffle: bool) -> str:
    """Which order the epochs go in (``rows``: ``SFTData`` or ``PreferenceData``)."""
    if not shuffle:
        return "rows in file order (data.shuffle = false), as TRL's train_sampling_strategy = \"sequential\""
    if rows.shuffler == "trl":
        return (f"shuffled as TRL's Trainer shuffles (data.order = \"trl\": accelerate's seeded sampler, "
                f"seed {rows.order_seed} + epoch)")
    return "shuffled by trainctl's seeded order (data.order = \"trainctl\"; \"trl\" is TRL's Trainer's)"


def optimizer_line(optim: Any) -> str:
    """The optimizer with the values TRL users compare, and TRL's where trainctl's differ."""
    line = (f"{optim.name}, lr {optim.lr:g}, betas ({optim.beta1:g}, {optim.beta2:g}), "
            f"weight decay {optim.weight_decay:g}, eps {optim.eps:g}")
    differ = []
    if optim.beta2 != TRL_BETA2:
        differ.append(f"beta2 {TRL_BETA2:g}")
    if optim.weight_decay != TRL_WEIGHT_DECAY:
        differ.append(f"weight decay {TRL_WEIGHT_DECAY:g}")
    return line + (f" (TRL's defaults: {', '.join(differ)})" if differ else "")
