import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(2)
# Triton kernels (attnkit.kernels) run in Triton's CPU interpreter where Triton is installed.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def fake_load(monkeypatch, model, tokenizer):
    """attnkit.models.load_model returning the test module's ``model`` and ``tokenizer``; records calls."""
    import attnkit.models

    calls = []

    def load_model(name, **kwargs):
        calls.append((name, kwargs))
        return model, tokenizer

    monkeypatch.setattr(attnkit.models, "load_model", load_model)
    return calls
