"""Where does a compressed-cache decode step spend its time? torch.profiler on the Llama-3-8B
shape (32 layers), 32K prompt, batch 1: the untouched model with sdpa's cuDNN backend left out
(the fast baseline), snapkv (2048) and razor (15% retrieval heads, C=8). Prints wall time per
step, the top ops by CPU time and by CUDA time, the op count per step, and the Python functions
by own time (cProfile).

    python scripts/profile_kv_decode.py
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kv import build, prefill, retrieval_heads  # noqa: E402
from bench_overhead import LLAMA3_8B  # noqa: E402

import attnkit  # noqa: E402
from attnkit.compat import cache_argument  # noqa: E402
from attnkit.engine.kvcache import sdpa_without_cudnn  # noqa: E402
from attnkit.methods import Razor, SnapKV  # noqa: E402

STEPS = 5
model = build(LLAMA3_8B, "cuda")
ids = torch.randint(0, LLAMA3_8B["vocab_size"], (1, 32768), device="cuda")
configs = {
    "full_no_cudnn": None,
    "snapkv": [SnapKV(budget=2048)],
    "razor": [Razor(heads=retrieval_heads(LLAMA3_8B, 0.15), local=4000, ratio=8.0)],
}
for name, methods in configs.items():
    handle = attnkit.apply(model, methods) if methods else None
    with torch.no_grad(), sdpa_without_cudnn():
        cache, token = prefill(model, ids)
        with_cache = cache_argument(model, cache)
        for _ in range(5):
            model(input_ids=token, **with_cache, use_cache=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            model(input_ids=token, **with_cache, use_cache=True)
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - start) / 20 * 1e3
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(STEPS):
                model(input_ids=token, **with_cache, use_cache=True)
            torch.cuda.synchronize()
    profiler = cProfile.Profile()
    with torch.no_grad(), sdpa_without_cudnn():
        profiler.enable()
        for _ in range(STEPS):
            model(input_ids=token, **with_cache, use_cache=True)
        torch.cuda.synchronize()
        profiler.disable()
    top_level = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    print(f"===== {name}: {step_ms:.2f} ms/step, {len(top_level) / STEPS:.0f} top-level aten ops/step", flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=16, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=50))
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    if handle:
        handle.remove()
    cache = None
    torch.cuda.empty_cache()
