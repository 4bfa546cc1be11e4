"""bench/bench_readahead.py runs end to end on tiny matrices and leaves the engine module as it found it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_readahead


def test_readahead_bench_smoke(tmp_path):
    import spectrum_fast
    from spectrum_fast import cuda_engine

    before = (sys.modules.get("spectrum_fast._C"), getattr(spectrum_fast, "_C", None), cuda_engine._CHUNK_BYTES,
              cuda_engine._warm)
    out = tmp_path / "ra.json"
    assert bench_readahead.main(["--matrices", "3", "--rows", "256", "--cols", "128", "--compute-gbps", "50",
                                 "--repeats", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["matrices"] == 3 and doc["matrix_bytes"] == 256 * 128 * 2
    assert len(doc["seconds"]["with"]) == len(doc["seconds"]["without"]) == 1
    assert doc["median_s"]["with"] > 0 and doc["speedup"] > 0
    after = (sys.modules.get("spectrum_fast._C"), getattr(spectrum_fast, "_C", None), cuda_engine._CHUNK_BYTES,
             cuda_engine._warm)
    assert after == before  # the stand-in engine and the bench's settings are gone
