"""Is the block-rotated attention kernel faster than it was at an earlier commit? Times
``attnkit.kernels.block_attention`` of this tree against the same file from another revision, and
sdpa without a mask (what a kernel reading every key at most pays), in interleaved rounds on
``tune_block_kernel``'s cases (Llama-3-8B attention shape, bf16): 4K tokens in 4 blocks and 8K in
22 (PINE's 2- and 20-segment prefills). Also the largest difference between the two outputs.

    git show <rev>:attnkit/kernels/blocks.py > old_blocks.py    # at the repository root, not committed
    python scripts/ab_block_kernel.py [--old old_blocks.py] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import turn  # noqa: E402
from tune_block_kernel import case, timed  # noqa: E402

from attnkit.kernels import blocks  # noqa: E402


def load(path: Path):
    spec = importlib.util.spec_from_file_location("old_blocks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, default=Path("old_blocks.py"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    old = load(args.old)
    for rows, keys, count in [(4096, 4096, 4), (8192, 8192, 22)]:
        inputs = case(rows, keys, count)
        inputs["query"] = query = inputs["query"].to(torch.bfloat16)
        key = inputs["keys"][0].repeat_interleave(4, 1)
        value = inputs["value"].repeat_interleave(4, 1)
        runs = {
            "old": lambda inputs=inputs: old.block_attention(**inputs),
            "new": lambda inputs=inputs: blocks.block_attention(**inputs),
            "sdpa_unmasked": lambda q=query, k=key, v=value: F.scaled_dot_product_attention(q, k, v),
        }
        difference = (runs["old"]().float() - runs["new"]().float()).abs().max().item()
        print(f"{rows} tokens in {count} blocks: largest difference old / new {difference:.2e}")
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds):
            for name in turn(runs, r):
                times[name].append(timed(runs[name]))
        for name, values in times.items():
            rounds = " ".join(f"{v:.3f}" for v in values)
            print(f"  {name:14s} {statistics.median(values):7.3f} ms  rounds {rounds}")


if __name__ == "__main__":
    main()
