"""Where does a TidalDecode decode step spend its time? torch.profiler over decode steps of the
untouched model and of ``tidaldecode``, on ``bench_tidal``'s in-place cache (Llama-3-8B shape,
random bf16 weights and cache, sdpa), the top operations by GPU and by host time for each.

    python scripts/profile_tidal.py [--context 32768] [--batch 1] [--budget 256]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tidal import FULL, buffers, build_model, make_cache  # noqa: E402
from profile_pine import report  # noqa: E402

import attnkit  # noqa: E402
from attnkit.compat import cache_argument  # noqa: E402
from attnkit.methods import TidalDecode  # noqa: E402


def steps(model, cache, token, count: int) -> None:
    """``count`` decode steps at a fixed context: the cache is rewound after each."""
    for _ in range(count):
        model(input_ids=token, **cache_argument(model, cache), use_cache=True)
        cache.crop(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=int, default=256)
    args = parser.parse_args()
    model = build_model(FULL, "cuda")
    held = buffers(FULL, args.batch, args.context + 8, "cuda")
    token = torch.randint(10, FULL["vocab_size"], (args.batch, 1), device="cuda")
    with torch.no_grad():
        for label, methods in [("untouched", None), (f"tidal {args.budget}", [TidalDecode(budget=args.budget)])]:
            cache = make_cache(model, held, args.batch, args.context)
            with attnkit.apply(model, methods) if methods else contextlib.nullcontext():
                steps(model, cache, token, 3)  # warm-up
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    steps(model, cache, token, 5)
                    torch.cuda.synchronize()
            report(prof, f"5 decode steps, {label}, context {args.context}, batch {args.batch}")


if __name__ == "__main__":
    main()
