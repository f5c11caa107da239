import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(2)
# Triton kernels (attnkit.kernels) run in Triton's CPU interpreter on a machine without a GPU; on a
# GPU the CUDA tests compile them (the interpreter there fails on device tensors).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    results that must match across runs or batch layouts, bit for bit."""
    from tests.factory import single_threaded

    with single_threaded():
        yield


@pytest.fixture(scope="module")
def tokenizer():
    """The character tokenizer of ``tests.test_tasks`` (a module may define its own instead)."""
    from tests.test_tasks import char_tokenizer

    return char_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (256 positions) and a character tokenizer saved as a local model folder."""
    from tests.factory import tiny_model
    from tests.test_tasks import char_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_model("llama-gqa").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


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
