"""tools/gpu_check.py: its CPU smoke mode runs, so the GPU check cannot rot between sessions that have a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOL = Path(__file__).parent.parent / "tools" / "gpu_check.py"


def test_smoke_mode_passes_and_writes_json(tmp_path):
    done = subprocess.run([sys.executable, str(TOOL), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["smoke"] and {"layers", "routers", "real_layer"} <= set(results)
    assert results["layers"]["mixtral float32"]["max_difference_over_rms"] < 1e-4
    assert results["real_layer"]["upload_gb_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_exits_3(tmp_path):
    done = subprocess.run([sys.executable, str(TOOL), "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 3 and "no CUDA" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()
