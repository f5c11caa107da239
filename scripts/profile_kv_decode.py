"""Where does a compressed-cache decode step spend its time? torch.profiler on a 4-layer model in
Llama-3-8B shape, 32K prompt, razor (15% retrieval heads, C=5) vs snapkv (2048) vs full.

    python scripts/profile_kv_decode.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attnkit  # noqa: E402
from attnkit.methods import Razor, SnapKV  # noqa: E402
from bench_kv import build, prefill, retrieval_heads  # noqa: E402
from bench_overhead import LLAMA3_8B  # noqa: E402

shape = {**LLAMA3_8B, "num_hidden_layers": 4}
model = build(shape, "cuda")
ids = torch.randint(0, shape["vocab_size"], (1, 32768), device="cuda")
for name, methods in {"full": None, "snapkv": [SnapKV(budget=2048)],
                      "razor": [Razor(heads=retrieval_heads(shape, 0.15), local=4000, ratio=5.0)]}.items():
    handle = attnkit.apply(model, methods) if methods else None
    with torch.no_grad():
        cache, token = prefill(model, ids)
        for _ in range(5):
            model(input_ids=token, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model(input_ids=token, past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
    print(f"===== {name}")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=6, max_name_column_width=60))
    if handle:
        handle.remove()
    cache = None
    torch.cuda.empty_cache()
