"""A bounded, deterministic fuzzer over ``--set`` overrides: every outcome of loading a config is
either a valid config (that ``config show`` can print and read back) or a ConfigError of one line,
never another exception. Keys come from every table of both backends and every built-in plugin,
values from the shapes that broke things before (scalars for sections, NUL and escape characters
in strings, nan/inf, 65-bit integers, dates, lists and tables in the wrong place)."""

from __future__ import annotations

import dataclasses
import random
import tomllib

import pytest

from tests.conftest import run_cli
from trainctl.kernel import config as cfg
from trainctl.kernel.errors import ConfigError
from trainctl.kernel.registry import Registry
from trainctl.kernel.schema import OptimConfig, TrainConfig

VALUES = [
    "0", "1", "-1", "7", "100000", "9223372036854775807", "9223372036854775808", "-9223372036854775809",
    "0.5", "-0.0", "1e308", "1e-320", "nan", "inf", "-inf", "true", "false", '""', '"cpu"', "cpu",
    '"cuda:0"', '"auto"', '"a\\u0000b"', '"\\u001b[31m"', '"line\\nbreak"', "'\\'", "[]", "[1, 2]",
    '["a"]', '["a", "b", "c"]', "[nan]", "{}", "{a = 1}", "1979-05-27T07:32:00Z", "07:32:00",
    "x=y", "\udcff", "", '"bfd"', '"messages"', '"cosine"', "[[1]]",
]
TOP = ["seed", "backend", "plugins", "train", "optim", "model", "data", "plugin", "hf", "plugin.lr", "zzz"]


def keys(registry: Registry) -> list[str]:
    found = {*TOP}
    for section, cls in (("train", TrainConfig), ("optim", OptimConfig)):
        found |= {f"{section}.{f.name}" for f in dataclasses.fields(cls)}
    for spec in registry.backends.values():
        found |= {f"model.{f.name}" for f in dataclasses.fields(spec.model_config)}
        found |= {f"data.{f.name}" for f in dataclasses.fields(spec.data_config)}
        for name, cls in spec.sections.items():
            found |= {f"{name}.{f.name}" for f in dataclasses.fields(cls)} | {f"{name}.lora.r", f"{name}.lora.dropout"}
    for name, spec in registry.plugins.items():
        found |= {f"plugin.{name}.{f.name}" for f in dataclasses.fields(spec.config)}
    return sorted(found)


def cases(registry: Registry, n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    names = keys(registry)
    everything = f"plugins={list(registry.plugins)!r}".replace("'", '"')
    out = []
    for _ in range(n):
        overrides = [f"{rng.choice(names)}={rng.choice(VALUES)}" for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.5:  # plugin tables are built only when their plugin is enabled
            overrides.insert(0, everything)
        out.append((rng.choice(["gpt", "hf"]), overrides))
    return out


def test_every_generated_override_is_a_valid_config_or_one_config_error_line():
    registry = Registry.discover(entry_points=False)
    outcomes = {"ok": 0, "error": 0}
    for backend, overrides in cases(registry, 400):
        try:
            resolved = cfg.load(None, registry, overrides=list(overrides), backend=backend, out_dir="o")
        except ConfigError as exc:
            message = str(exc)
            assert message and "\n" not in message, (overrides, message)
            outcomes["error"] += 1
            continue
        except Exception as exc:  # the point of the test: nothing else ever escapes
            pytest.fail(f"{overrides} ({backend}) raised {type(exc).__name__}: {exc}")
        again = cfg.resolve(tomllib.loads(cfg.dump_toml(resolved.to_dict())), registry)  # config show reads back
        assert again.to_dict() == resolved.to_dict(), overrides
        outcomes["ok"] += 1
    print(outcomes)
    assert outcomes["ok"] > 20 and outcomes["error"] > 200  # both kinds of outcome are exercised


@pytest.mark.parametrize("override, expected", [
    ("train=1", "[train] must be a table, got an integer 1; set its keys instead: train.KEY = VALUE"),
    ('train.device="cpu\\u0000"', "train.device must not hold control characters, got '\\x00' in 'cpu\\x00'"),
    ("train.peak_tflops=nan", "train.peak_tflops must be a finite number, got nan"),
    ("train.dist_timeout_s=inf", "train.dist_timeout_s must be a finite number, got inf"),
    ("seed=9223372036854775808", "seed is out of range (a 64-bit integer), got 9223372036854775808"),
    ("train.device=tpu", "[train] device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
])
def test_the_classes_the_fuzzer_found_through_the_cli(tmp_path, override, expected):
    proc = run_cli("run", "--dry-run", "--out", str(tmp_path / "o"), "--set", override)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"trainctl: error: {expected}"], proc.stderr
    assert proc.stdout == "" and not (tmp_path / "o").exists()
