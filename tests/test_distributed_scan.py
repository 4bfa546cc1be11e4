"""Scans across ranks with torchrun on the CPU (gloo): identical results, and a failing rank fails the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from .conftest import save_np
from .ranks import free_port

pytestmark = pytest.mark.slow
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    shapes = [(512, 128), (256, 256), (96, 400), (64, 64), (300, 200)]
    t = {f"model.layers.{i}.mlp.p{j}.weight": (rng.standard_normal(s) * (1 + i)).astype(np.float32)
         for i in range(4) for j, s in enumerate(shapes)}
    d = tmp_path_factory.mktemp("dist") / "m"
    save_np(d / "model-00001-of-00002.safetensors", dict(list(t.items())[:10]))
    save_np(d / "model-00002-of-00002.safetensors", dict(list(t.items())[10:]))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: f"model-0000{1 if i < 10 else 2}-of-00002.safetensors" for i, k in enumerate(t)}}))
    return d


def _torchrun(n: int, args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(3):  # the free port can be taken between probing and binding: try another
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        if "address already in use" not in r.stderr.lower():
            return r
    return r


@pytest.mark.parametrize("n", [2, 3])
def test_ranks_give_the_single_process_result(model_dir, tmp_path, n):
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "spectrum_fast.scan", str(model_dir), "--out", str(single), "--quiet"],
                   check=True)
    out = tmp_path / f"ranks{n}"
    r = _torchrun(n, ["-m", "spectrum_fast.scan", str(model_dir), "--out", str(out), "--quiet"])
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((out / "snr_results_m.json").read_text())
    want = json.loads((single / "snr_results_m.json").read_text())
    assert list(got) == list(want)
    for k in want:
        assert got[k]["type"] == want[k]["type"]
        assert abs(got[k]["snr"] - want[k]["snr"]) <= 1e-4 * abs(want[k]["snr"]), k
    assert sorted(p.name for p in out.iterdir()) == ["snr_results_m.json", "spectrum_fast_m.json"]  # no journals left


def test_a_failing_rank_fails_the_run_with_its_error(model_dir, tmp_path):
    script = tmp_path / "fail_rank1.py"
    script.write_text(
        "import os, sys\n"
        "import spectrum_fast.scanner as sc\n"
        "real = sc.matrix_stats\n"
        "def broken(*a, **k):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise sc.SpectrumError('disk on fire')\n"
        "    return real(*a, **k)\n"
        "sc.matrix_stats = broken\n"
        "from spectrum_fast.cli import scan_main\n"
        f"sys.exit(scan_main([{str(model_dir)!r}, '--out', {str(tmp_path / 'o')!r}, '--quiet']))\n")
    r = _torchrun(2, [str(script)], timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("rank 1 of 2 failed: disk on fire") == 2  # both ranks report rank 1's error
    assert not (tmp_path / "o" / "snr_results_m.json").exists()


def test_two_machines_give_the_single_process_result(model_dir, tmp_path):
    """``torchrun --nnodes 2``: two launches (one per machine, here both on loopback), each with its own output
    folder as on machines that share no disk; global rank 0 writes the files, every rank removes its journal."""
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "spectrum_fast.scan", str(model_dir), "--out", str(single), "--quiet"],
                   check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(3):  # the free port can be taken between probing and binding: try another
        port = free_port()
        nodes = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m",
             "spectrum_fast.scan", str(model_dir), "--out", str(tmp_path / f"node{node}"), "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for node in (0, 1)]
        try:
            outs = [p.communicate(timeout=240) for p in nodes]
        finally:
            for p in nodes:
                if p.poll() is None:
                    p.kill()
        if not any("address already in use" in err.lower() for _, err in outs):
            break
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    got = json.loads((tmp_path / "node0" / "snr_results_m.json").read_text())
    want = json.loads((single / "snr_results_m.json").read_text())
    assert list(got) == list(want)
    for k in want:
        assert abs(got[k]["snr"] - want[k]["snr"]) <= 1e-4 * abs(want[k]["snr"]), k
    assert sorted(p.name for p in (tmp_path / "node0").iterdir()) == ["snr_results_m.json", "spectrum_fast_m.json"]
    assert list((tmp_path / "node1").iterdir()) == []  # ranks 2 and 3: no files, journals removed
