import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(2)
# Triton kernels (attnkit.kernels) run in Triton's CPU interpreter where Triton is installed.
os.environ.setdefault("TRITON_INTERPRET", "1")
