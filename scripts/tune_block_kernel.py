"""Which launch configuration suits the block-rotated attention kernel? Times
``attnkit.kernels.block_attention`` on random inputs in the Llama-3-8B attention shape (32 query heads,
8 KV heads, head dim 128, bf16) against sdpa's causal attention of the same size, for a prefill of
4K tokens in 4 blocks, one of 8K tokens in 22 blocks (PINE's 2- and 20-segment cases) and a decode
step over 8K keys; every configuration of a small grid, the best first.

    python scripts/tune_block_kernel.py
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attnkit import kernels  # noqa: E402


def timed(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def case(rows: int, keys: int, blocks: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, rows, 128, device="cuda", generator=gen)
    k = torch.randn(1, 8, keys, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(1, 8, keys, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    edges = torch.linspace(0, keys, blocks + 1, device="cuda").long()
    block = torch.bucketize(torch.arange(keys, device="cuda"), edges[1:-1], right=True)[None]
    positions = torch.randint(0, keys, (1, 32, rows, blocks), device="cuda", generator=gen)
    angles = torch.arange(2 * keys, device="cuda")[:, None] * 500000.0 ** (-torch.arange(64, device="cuda") / 64)
    angles = torch.cat([angles, angles], -1)
    groups = None
    if rows > 1:
        groups = (block[:, -rows:] * (block[:, -rows:] < blocks - 1), block * (block < blocks - 1))
    return dict(
        query=q,
        positions=positions,
        table=(angles.cos(), angles.sin()),
        keys=(k,),
        value=v,
        blocks=block,
        scale=128**-0.5,
        open_groups=groups,
        runs=kernels.block_runs(block, blocks, groups[1] if groups is not None else None),
    )


def tune(name: str, rows: int, keys: int, blocks: int) -> None:
    args = case(rows, keys, blocks)
    q = args["query"].to(torch.bfloat16)
    k, v = (t.repeat_interleave(4, 1) for t in (args["keys"][0], args["value"]))
    causal = rows > 1
    sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
    if rows > 1:
        grid = itertools.product([64, 128], [32, 64], [4, 8], [2, 3])
        configs = [dict(BM=bm, BN=bn, num_warps=w, num_stages=s) for bm, bn, w, s in grid]
    else:
        grid = itertools.product([16], [64], [4], [2, 3], [16, 32])
        configs = [dict(BM=bm, BN=bn, num_warps=w, num_stages=s, SPLITS=sp, SPLIT_KEYS=-(-keys // sp))
                   for bm, bn, w, s, sp in grid]  # fmt: skip
    results = []
    for config in configs:
        try:
            ms = timed(lambda config=config: kernels.block_attention(**args, config=config))
        except Exception as error:  # out of shared memory or registers for this tile
            print(f"  {config}: {type(error).__name__}")
            continue
        results.append((ms, config))
    results.sort(key=lambda r: r[0])
    default = timed(lambda: kernels.block_attention(**args))
    narrow = timed(lambda: kernels.block_attention(**{**args, "query": q}))
    no_tail = timed(lambda: kernels.block_attention(**{**args, "query": q}, config={"TAIL": 0}))
    half = tuple(t[:, :64].to(torch.bfloat16).contiguous() for t in args["table"])  # what a bf16 model's PINE reads
    halved = timed(lambda: kernels.block_attention(**{**args, "query": q, "table": half}))
    whole = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    print(
        f"\n{name}: sdpa {'causal ' if causal else ''}{sdpa:.3f} ms, not causal {whole:.3f} ms; "
        f"default {default:.3f} ms (float32 query), {narrow:.3f} ms (bf16 query), "
        f"{no_tail:.3f} ms (bf16 query, a run's last keys in a whole tile), "
        f"{halved:.3f} ms (bf16 query, one half of a bf16 table)",
        flush=True,
    )
    for ms, config in results[:6]:
        print(f"  {ms:.3f} ms ({ms / sdpa:.2f}x sdpa)  {config}", flush=True)


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    tune("prefill 4k/4 blocks", 4096, 4096, 4)
    tune("prefill 8k/22 blocks", 8192, 8192, 22)
    tune("prefill 8k/4 blocks (what 18 more blocks cost)", 8192, 8192, 4)
    tune("decode 8k/22 blocks", 1, 8192, 22)


if __name__ == "__main__":
    main()
