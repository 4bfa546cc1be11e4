"""The SNR formula (SPEC.md §1) on singular values given directly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spectrum_fast.snr import snr_from_singular_values, snr_interval


def test_formula_by_hand():
    # k = 8 values of a 8x32 matrix: beta = 1/4, 1 + sqrt(beta) = 1.5
    s = np.array([10.0, 6.0, 1.2, 1.1, 1.0, 0.9, 0.8, 0.7])
    asc = np.sort(s)
    q25 = asc[1] + 0.75 * (asc[2] - asc[1])  # position 7 * 0.25 = 1.75
    q75 = asc[5] + 0.25 * (asc[6] - asc[5])  # position 7 * 0.75 = 5.25
    tau = (q75 - q25) / 1.349 * 1.5
    signal = s[s > tau].sum()
    noise = s[s <= tau].sum()
    st = snr_from_singular_values(s, 8, 32)
    assert st.tau == pytest.approx(tau, rel=1e-15)
    assert st.snr == pytest.approx(signal / noise / 10.0, rel=1e-15)
    assert st.sigma_max == 10.0
    assert st.n_signal == int((s > tau).sum())
    assert not st.noise_free


def test_noise_free_uses_one():
    # all values equal: IQR 0, tau 0, nothing <= tau -> noise := 1 (reference behaviour)
    st = snr_from_singular_values(np.full(5, 2.0), 5, 5)
    assert st.noise_free
    assert st.snr == pytest.approx(5 * 2.0 / 1.0 / 2.0)


def test_single_value():
    st = snr_from_singular_values(np.array([3.0]), 1, 100)
    assert st.snr == pytest.approx(1.0)


def test_wrong_count_rejected():
    with pytest.raises(ValueError, match="expected 4 singular values"):
        snr_from_singular_values(np.ones(3), 4, 6)


def test_interval_encloses_perturbed_values():
    rng = np.random.default_rng(0)
    s = np.sort(np.concatenate([rng.uniform(0.5, 1.0, 200), [5.0, 8.0, 13.0]]))
    d = 1e-6
    lo, hi = s - d, s + d
    enc = snr_interval(lo, hi, 203, 400)
    assert enc is not None
    for _ in range(50):
        p = np.sort(s + rng.uniform(-d, d, s.size))
        v = snr_from_singular_values(p, 203, 400).snr
        assert enc[0] <= v <= enc[1]


def test_interval_refuses_value_on_threshold():
    s = np.sort(np.array([0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 4.0]))
    tau = snr_from_singular_values(s, 8, 8).tau
    s2 = np.sort(np.append(s[:-1], tau))  # put one value exactly on tau
    s2 = np.append(s2, 4.0)[-8:]
    tau2 = snr_from_singular_values(s2, 8, 8).tau
    s3 = s2.copy()
    s3[np.argmin(np.abs(s3 - tau2))] = tau2
    assert snr_interval(s3 - 1e-3, s3 + 1e-3, 8, 8) is None
    assert not math.isnan(snr_from_singular_values(s3, 8, 8).snr)
