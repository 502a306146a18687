import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


# figures are drawn off-screen in tests
os.environ.setdefault("MPLBACKEND", "Agg")
# models load from local files only; never ask a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
