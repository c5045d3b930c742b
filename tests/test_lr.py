"""Each schedule, point by point, against values worked out by hand."""

from __future__ import annotations

import pytest

from trainctl.plugins.lr import constant, cosine, inverse_sqrt, linear, wsd

KW = dict(lr=1e-3, warmup=100, decay_steps=2000, min_lr=1e-4)


@pytest.mark.parametrize("fn", [cosine, linear, constant, wsd, inverse_sqrt])
def test_warmup_is_linear_from_the_first_step(fn):
    assert fn(0, **KW) == pytest.approx(1e-3 / 101)
    assert fn(49, **KW) == pytest.approx(1e-3 * 50 / 101)
    assert fn(99, **KW) == pytest.approx(1e-3 * 100 / 101)


@pytest.mark.parametrize(("step", "want"), [(100, 1e-3), (1050, 5.5e-4), (2000, 1e-4), (2001, 1e-4), (5000, 1e-4)])
def test_cosine_is_nanogpts_get_lr(step, want):
    assert cosine(step, **KW) == pytest.approx(want)


def test_cosine_quarter_point():
    # ratio 0.25: min + 0.5 * (1 + cos(pi/4)) * (lr - min)
    assert cosine(575, **KW) == pytest.approx(1e-4 + 0.5 * (1 + 2**-0.5) * 9e-4)


@pytest.mark.parametrize(("step", "want"), [(100, 1e-3), (1050, 5.5e-4), (2000, 1e-4), (3000, 1e-4)])
def test_linear(step, want):
    assert linear(step, **KW) == pytest.approx(want)


@pytest.mark.parametrize("step", [100, 1000, 10**6])
def test_constant(step):
    assert constant(step, **KW) == pytest.approx(1e-3)


@pytest.mark.parametrize(("step", "want"), [(100, 1e-3), (1599, 1e-3), (1600, 1e-3), (1800, 5.5e-4), (2000, 1e-4), (2500, 1e-4)])
def test_warmup_stable_decay(step, want):
    assert wsd(step, **KW) == pytest.approx(want)


def test_wsd_decay_fraction():
    assert wsd(1000, **KW, decay_fraction=0.5) == pytest.approx(1e-3)
    assert wsd(1500, **KW, decay_fraction=0.5) == pytest.approx(5.5e-4)


@pytest.mark.parametrize(("step", "want"), [(99, 1e-3 * 100 / 101), (100, 1e-3 * (100 / 101) ** 0.5), (399, 5e-4), (9999, 1e-4)])
def test_inverse_sqrt(step, want):
    assert inverse_sqrt(step, **KW) == pytest.approx(want)


def test_inverse_sqrt_floors_at_min_lr():
    assert inverse_sqrt(10**7, **KW) == pytest.approx(1e-4)
