"""Shared test setup: everything runs offline on the CPU, with small shapes and fixed seeds."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by torch at import and by sample.pick_threads in every main()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "assets"  # present on developer machines and in CI, not on a user's machine

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # small tests gain nothing from a 2nd thread, and on a busy machine it waits for it


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
