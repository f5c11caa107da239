"""What does a decode step cost with attnkit's decode-time methods applied? Step time and tokens/s
against the untouched model, per context and batch.

Llama-3-8B shape (32 layers, 32 query / 8 KV heads of 128), random bf16 weights, sdpa, one GPU.
Configurations:

- ``untouched``: the model as transformers runs it, torch's default sdpa settings (cuDNN allowed);
- ``untouched_no_cudnn``: the same with sdpa's cuDNN backend left out, the other half of the
  "best of cuDNN on and off" baseline; ``snapkv_no_cudnn``, ``streaming_no_cudnn``,
  ``razor_no_cudnn`` and ``tidaldecode_no_cudnn`` the same for each method's own cache;
- ``identity`` (an empty recipe), ``head_mask`` (4 heads on 2 layers zeroed) and ``act`` (ACT's
  defaults: every head of layers 2 to 30, the fast path);
- ``snapkv``, ``streaming`` (budget ``--budget``) and ``razor`` (15% retrieval heads, 4,000 local
  tokens, C=8), and ``act``, each from a real prefill of ``context`` tokens at batch 1, repeated
  along the batch (the prefill runs once per method and context; every round decodes a fresh copy);
- ``tidaldecode`` (budget ``--budget``, per query head);
- ``captured``: the untouched model's decode step replayed from a CUDA graph (attnkit's captured
  decoding, an empty recipe), and ``head_mask_captured``, ``act_captured``, ``snapkv_captured``,
  ``streaming_captured``, ``razor_captured``, ``tidaldecode_captured`` the same with those methods;
- ``*_captured_compiled``: the same with the model's own code compiled by ``torch.compile``
  (``captured_decoding(compile=True)``); the first round's warm-up, which compiles, is reported;
- ``hf_compiled``: the untouched model as transformers compiles it, a ``StaticCache`` and
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), the cache copied from the random one
  (cases of at most ``--hf-compiled-tokens`` cached tokens: the copy doubles the cache's memory).

Uncompressed configurations decode from a cache made directly: seeded random keys and values in
preallocated buffers, written in place (``bench_tidal.InPlaceLayer``: transformers' DynamicCache
concatenates the whole cache at every step, a copy that would dilute every ratio). Every step sees
``context`` tokens (the cache is rewound after each).

``--capacity``: after the ``--batches`` of a context (none: ``--batches`` with no value), each
cache at the largest batch that fits it. The
configurations split into groups by the cache they decode from: the full cache (``untouched*``,
``captured*``, ``tidaldecode*``) and each KV method's compressed one. A group's batch is the GPU's
free memory (less ``--reserve-gb``) over one row's bytes (the full cache's: its keys and values;
a compressed one's: measured after a real prefill), halved where the group has a captured KV
configuration (captured decoding copies the prefill's cache into its own buffers, so both are held
for a moment); on running out of memory the group starts again at 85% of the batch. Each group's
ratios are against its own first eager configuration under torch's defaults (``untouched``,
``snapkv``, ...).

Timing: configurations take turns in interleaved rounds (the order rotated one place each round), each a
block of ``--steps`` steps after ``--warmup`` untimed ones (CUDA events). A configuration's step is
the median over rounds of its block's mean; spread = (max - min) / median over rounds. A ratio whose
distance from 1 is inside the untouched model's spread is "within noise". ``--profile`` adds, per
configuration, a torch.profiler count per step of host-side operator calls, kernel launches, host
syncs and GPU busy time.

    python scripts/bench_decode.py [--contexts 4096 32768] [--batches 1 16] [--rounds 4] [--json out.json]
    python scripts/bench_decode.py --capacity --contexts 4096 32768 --configs untouched_no_cudnn snapkv ...
    python scripts/bench_decode.py --quick          # a tiny model on the CPU, to smoke-test the script
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kv import batch_cache, retrieval_heads  # noqa: E402
from bench_overhead import turn  # noqa: E402
from bench_tidal import FULL, TINY, buffers, build_model, decode_block, make_cache, timed_ms  # noqa: E402

import attnkit  # noqa: E402
from attnkit.compat import cache_argument  # noqa: E402
from attnkit.decode import Replay, compile_limits, graph_copy, graph_step  # noqa: E402
from attnkit.engine.graphs import GraphCache, GraphLayer, graph_inputs  # noqa: E402
from attnkit.engine.kvcache import CompressedLayer, cache_bytes, sdpa_without_cudnn  # noqa: E402
from attnkit.methods import ACT, HeadMask, Razor, SnapKV, Streaming, TidalDecode  # noqa: E402

PREFILLED = {"snapkv", "streaming", "razor", "act"}
"""Configurations that decode from a real prefill (their methods act on it), not the random cache."""
FIRED = {
    "act": "layer_calls",
    "head_mask": "head_outputs_scaled",
    "snapkv": "layers_compressed",
    "streaming": "layers_compressed",
    "razor": "layers_compressed",
    "tidaldecode": "selections",
}
"""The stats counter that shows each method acted."""


def configurations(shape: dict, budget: int) -> dict[str, list | None]:
    layers = shape["num_hidden_layers"]
    methods = {
        "head_mask": lambda: [HeadMask(heads={layers // 4: [0, 1], 3 * layers // 4: [2, 3]}, scale=0.0)],
        "snapkv": lambda: [SnapKV(budget=budget)],
        "streaming": lambda: [Streaming(budget=budget)],
        "razor": lambda: [Razor(heads=retrieval_heads(shape, 0.15), local=min(4000, budget * 2), ratio=8.0)],
        "tidaldecode": lambda: [TidalDecode(budget=budget)],
        "act": lambda: [ACT()],
    }
    configs: dict[str, list | None] = {
        "untouched": None,
        "hf_compiled": None,
        "untouched_no_cudnn": None,
        "identity": [],
        "captured": [],
        "captured_compiled": [],
    }
    for name, made in methods.items():
        configs[name] = made()
        if name in KV_METHODS or name == "tidaldecode":
            configs[f"{name}_no_cudnn"] = made()
        for variant in ("captured", "captured_compiled"):
            configs[f"{name}_{variant}"] = made()
    return configs


KV_METHODS = ("snapkv", "streaming", "razor")
"""The methods that decode from a compressed cache of their own (a group of their own under ``--capacity``)."""


def prompt(model, context: int) -> torch.Tensor:
    """The seeded random prompt [1, context] that KV methods prefill."""
    gen = torch.Generator(device=model.device).manual_seed(2)
    return torch.randint(0, model.config.vocab_size, (1, context), device=model.device, generator=gen)


class Case:
    """One (context, batch) case: the model, the shared random cache and how each configuration decodes."""

    def __init__(self, model, held: list, context: int, batch: int, device: str, prefills: dict | None = None):
        self.model, self.context, self.batch, self.device = model, context, batch, device
        self.cache = make_cache(model, held, batch, context) if held is not None else None
        self.warmups: dict[str, float] = {}
        """Seconds of each configuration's first warm-up block (compilation included)."""
        self.token = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
        self.prompt = prompt(model, context)
        self.prefills = prefills if prefills is not None else {}
        """Each KV method's compressed prefill at batch 1, with its next token, by method name."""

    def prefilled(self, name: str):
        """A fresh copy of the KV method's compressed prefill of the case's prompt, repeated along the
        batch, for the method's handle now applied. The prefill runs once per method and context (at
        128K it takes seconds; every round of every variant would pay it twice): each later round's
        handle, of the same method and settings, adopts a copy."""
        kind = name.split("_")[0]
        if kind not in self.prefills:
            self.prefills[kind] = first_prefill(self.model, self.prompt, kind)
        cache, token = copy.deepcopy(self.prefills[kind])
        adopt(cache, self.model)
        if self.batch > 1:
            cache.batch_repeat_interleave(self.batch)
            token = token.repeat_interleave(self.batch, dim=0)
        return cache, token

    def decoder(self, name: str, most: int):
        """A callable running ``count`` (at most ``most``) decode steps of this configuration: one per
        round serves its warm-up and its timed block, so a round copies a prefill and captures a
        graph once."""
        if name == "hf_compiled":
            return self.hf_compiled()
        if "captured" in name:
            return self.captured(name, most)
        if name.split("_")[0] in PREFILLED:
            cache, token = self.prefilled(name)
            with_cache = cache_argument(self.model, cache)

            def run(count: int) -> None:
                for _ in range(count):
                    self.model(input_ids=token, **with_cache, use_cache=True)

            return run
        return lambda count: decode_block(self.model, self.cache, self.token, count)()

    def captured(self, name: str, most: int):
        """Replays of one captured decode step (attnkit.decode): over the same random cache, adopted
        in place as the graph's buffers, or for a KV method over its compressed prefill, copied as the
        decoding loop copies it (room for ``most`` steps). The step's token is written before each
        replay, as the loop does. Rewound after each block."""
        handle = attnkit.handle.active_handle(self.model)
        if name.split("_")[0] in PREFILLED:
            cache, _ = self.prefilled(name)
            graphed = graph_copy(handle, cache, most + 1, None)
        else:
            buffers = [(layer.key_buffer, layer.value_buffer) for layer in self.cache.layers]
            inputs = graph_inputs(self.batch, self.context, None, self.device)
            layers = [GraphLayer(k, v, self.context, self.context, inputs) for k, v in buffers]
            graphed = GraphCache(layers, inputs)
        compiled = name.endswith("compiled")
        forward, _ = graph_step(self.model, graphed, compiled)
        replay = Replay(forward, graphed, handle, compiled)
        tokens = self.token[:, 0]

        def run(count: int) -> None:
            for _ in range(count):
                replay(tokens)
            replay.rewind(count)

        return run

    def hf_compiled(self):
        """Decode steps of the untouched model over a StaticCache holding the random cache, through
        ``torch.compile(mode="reduce-overhead")`` (made at the first call, kept for the case)."""
        if not hasattr(self, "static"):
            from transformers import StaticCache

            self.static = StaticCache(config=self.model.config, max_cache_len=self.context + 8)
            for layer, cached in zip(self.static.layers, self.cache.layers):
                keys, values = cached.key_buffer, cached.value_buffer
                layer.lazy_initialization(keys[:, :, :1], values[:, :, :1])
                layer.keys[:, :, : self.context] = keys[:, :, : self.context]
                layer.values[:, :, : self.context] = values[:, :, : self.context]
                layer.cumulative_length.fill_(self.context)
            self.compiled = torch.compile(self.model, mode="reduce-overhead")
        with_cache = cache_argument(self.model, self.static)

        def run(count: int) -> None:
            with compile_limits(len(self.static.layers)):  # the model's frames hold attnkit's compiled entries too
                for _ in range(count):
                    torch.compiler.cudagraph_mark_step_begin()
                    self.compiled(input_ids=self.token, **with_cache, use_cache=True)
                    for layer in self.static.layers:
                        layer.cumulative_length.sub_(1)

        return run


def first_prefill(model, ids: torch.Tensor, kind: str):
    """The compressed prefill of ``ids`` at batch 1 under the applied handle, checked to be compressed."""
    cache, token = batch_cache(model, ids, 1)
    stats = attnkit.handle.active_handle(model).stats(total=True)[kind]
    if not stats.get("layers_compressed", 0) and kind != "act":
        raise RuntimeError(f"{kind} did not compress the prefill: {stats}")
    return cache, token


def adopt(cache, model) -> None:
    """Let the handle now applied decode ``cache``, compressed under an earlier handle of the same
    method and settings: a compressed layer refuses any handle but its own, to protect users from
    decoding a layout no active method reads; here every round applies the same method again."""
    handle = attnkit.handle.active_handle(model)
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer):
            layer._owner_active = lambda: attnkit.handle.active_handle(model) is handle


def backends(name: str):
    """sdpa's backends for ``name``: cuDNN left out for ``*_no_cudnn``, torch's defaults otherwise."""
    return sdpa_without_cudnn() if name.endswith("_no_cudnn") else contextlib.nullcontext()


def one_round(case: Case, name: str, methods, args) -> tuple[float, dict]:
    """The mean step of one timed block of ``name``, and its methods' stats."""
    handle = attnkit.apply(case.model, methods) if methods is not None else None
    context = backends(name)
    try:
        with torch.no_grad(), context:
            began = time.perf_counter()
            run = case.decoder(name, max(args.warmup, args.steps))
            run(args.warmup)
            case.warmups.setdefault(name, time.perf_counter() - began)
            ms = timed_ms(lambda: run(args.steps), case.device) / args.steps
        stats = handle.stats(total=True) if handle else {}
    finally:
        if handle:
            handle.remove()
    for label, values in stats.items():
        counted = label in KV_METHODS or values.get(FIRED[label], 0) > 0  # KV methods: checked by first_prefill
        if not (values["phases"].get("decode") and counted):
            raise RuntimeError(f"{label} did not act: {values}")
    return ms, stats


def profile(case: Case, name: str, methods, steps: int) -> dict[str, float]:
    """Per decode step: host-side operator calls, kernel launches, host syncs, GPU busy ms, wall ms."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    handle = attnkit.apply(case.model, methods) if methods is not None else None
    context = backends(name)
    try:
        with torch.no_grad(), context:
            decode = case.decoder(name, max(3, steps))
            decode(3)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.device == "cuda" else [])
            with torch_profile(activities=activities) as prof:
                began = time.perf_counter()
                decode(steps)
                if case.device == "cuda":
                    torch.cuda.synchronize()
                wall = (time.perf_counter() - began) * 1e3
    finally:
        if handle:
            handle.remove()
    events = prof.events()
    ops = sum(1 for e in events if e.device_type.name == "CPU" and e.name.startswith("aten::") and e.cpu_parent is None)
    launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(1 for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync"))
    busy = sum(e.device_time for e in events if e.device_type.name == "CUDA") / 1e3
    return {
        "top_level_ops": ops / steps,
        "kernel_launches": launches / steps,
        "syncs_or_copies": syncs / steps,
        "gpu_busy_ms": busy / steps,
        "wall_ms_profiled": wall / steps,
    }


def run_case(case: Case, configs: dict, args, base_name: str = "untouched") -> dict:
    """Interleaved rounds of ``configs`` on ``case``; ratios against ``base_name``."""
    rounds: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name in turn(configs, r):
            ms, _ = one_round(case, name, configs[name], args)
            rounds[name].append(ms)
    base = statistics.median(rounds[base_name])
    base_spread = (max(rounds[base_name]) - min(rounds[base_name])) / base
    rows = {}
    for name, times in rounds.items():
        step = statistics.median(times)
        ratio = step / base
        rows[name] = {
            "step_ms": step,
            "rounds_ms": times,
            "spread": (max(times) - min(times)) / step,
            "tokens_per_s": case.batch * 1e3 / step,
            "ratio": ratio,
            "within_noise": abs(ratio - 1) <= base_spread,
            "first_warmup_s": case.warmups[name],
        }
        if args.profile:
            rows[name]["profile"] = profile(case, name, configs[name], args.profile_steps)
    return rows


def groups(configs: dict) -> dict[str, dict]:
    """The configurations by the cache they decode from: ``full`` and each KV method's own."""
    split: dict[str, dict] = {}
    for name, methods in configs.items():
        kind = name.split("_")[0]
        if kind in KV_METHODS:
            split.setdefault(kind, {})[name] = methods
        elif kind in ("untouched", "captured", "tidaldecode"):  # hf_compiled's StaticCache copy doubles the cache
            split.setdefault("full", {})[name] = methods
    return {kind: members for kind, members in split.items() if kind == "full" or kind in members}


def extent(context: int, args) -> int:
    """Slots of a random cache for ``context`` tokens: the context, every step a block runs, and spare."""
    return context + args.steps + args.warmup + 8


def row_bytes(model, context: int, kind: str, methods, args, prefills: dict) -> int:
    """One batch row's cache: the full cache's keys and values, or a KV method's after a real prefill
    (kept in ``prefills`` for the case's rounds)."""
    if kind == "full":
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * model.dtype.itemsize
        return per_token * extent(context, args)
    if kind not in prefills:
        with torch.no_grad(), attnkit.apply(model, methods):
            prefills[kind] = first_prefill(model, prompt(model, context), kind)
    return cache_bytes(prefills[kind][0])


def free_bytes(device: str, args) -> float:
    if device == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0] - args.reserve_gb * 1e9
    return args.reserve_gb * 1e9  # the CPU smoke test: --reserve-gb is the memory to fill


def capacity_case(
    model, shape: dict, context: int, kind: str, configs: dict, args, device: str, prefills: dict
) -> tuple[int, dict]:
    """The group's configurations at the largest batch its cache fits (85% of it after running out)."""
    args = argparse.Namespace(**{**vars(args), "steps": args.capacity_steps})
    first = next(iter(configs.values()))
    copies = 2 if kind != "full" and any("captured" in name for name in configs) else 1
    one_row = row_bytes(model, context, kind, first, args, prefills)
    batch = max(1, int(free_bytes(device, args) // (copies * one_row)))
    while True:
        try:
            held = buffers(shape, batch, extent(context, args), device) if kind == "full" else None
            case = Case(model, held, context, batch, device, prefills)
            return batch, run_case(case, configs, args, next(iter(configs)))
        except torch.OutOfMemoryError:
            print(f"  {kind}: out of memory at batch {batch}, again at 85%", flush=True)
            held = None
            batch = max(1, int(batch * 0.85))
            if device == "cuda":
                torch.cuda.empty_cache()


def show(title: str, rows: dict, base_name: str) -> None:
    print(title, flush=True)
    for name, row in rows.items():
        noise = "  within noise" if row["within_noise"] and name != base_name else ""
        print(
            f"  {name:<19} {row['step_ms']:8.2f} ms/step {row['tokens_per_s']:9.1f} tok/s "
            f"{row['ratio']:6.3f}x  spread {row['spread']:5.1%}  rounds "
            + " ".join(f"{t:.2f}" for t in row["rounds_ms"])
            + f"  first warm-up {row['first_warmup_s']:.1f} s"
            + noise,
            flush=True,
        )
        if "profile" in row:
            print("      " + "  ".join(f"{k} {v:.1f}" for k, v in row["profile"].items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model on the CPU, to smoke-test the script")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--capacity", action="store_true", help="also each cache at the largest batch it fits")
    parser.add_argument("--reserve-gb", type=float, default=10.0, help="GPU memory --capacity leaves free")
    parser.add_argument("--capacity-steps", type=int, default=8, help="timed steps per block at capacity")
    parser.add_argument("--configs", nargs="+", help="a subset of the configurations (untouched is always run)")
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--tidal-budgets", type=int, nargs="*", help="also TidalDecode at these budgets")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--hf-compiled-tokens", type=int, default=65536, help="largest batch x context for hf_compiled")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shape, device = (TINY, "cpu") if args.quick else (FULL, "cuda")
    if args.quick:
        args.contexts, args.batches, args.budget = [256], [1, 2], 64
        args.rounds, args.steps, args.warmup, args.profile_steps, args.capacity_steps = 2, 2, 1, 2, 2
        args.reserve_gb = 0.02 if args.capacity else args.reserve_gb
    configs = configurations(shape, args.budget)
    for budget in args.tidal_budgets or []:  # TidalDecode at other budgets, eager and captured
        configs[f"tidaldecode_{budget}"] = [TidalDecode(budget=budget)]
        configs[f"tidaldecode_{budget}_captured"] = [TidalDecode(budget=budget)]
        configs[f"tidaldecode_{budget}_captured_compiled"] = [TidalDecode(budget=budget)]
    if args.configs:
        configs = {
            n: m
            for n, m in configs.items()
            if n == "untouched" or n in args.configs or "_" in n and n.split("_")[1].isdigit()
        }
    if device == "cpu":  # CUDA graphs need a GPU
        configs = {n: m for n, m in configs.items() if "captured" not in n and n != "hf_compiled"}
    model = build_model(shape, device)
    results: dict[str, Any] = {}
    for context in args.contexts:
        prefills: dict = {}  # each KV method's prefill of this context, shared by every case
        room = free_bytes(device, args) // row_bytes(model, context, "full", None, args, prefills)
        batches = [b for b in args.batches if b <= room]
        if batches != args.batches:
            print(f"context {context}: the full cache fits {room} rows; batches {batches} only", flush=True)
        held = buffers(shape, max(batches), extent(context, args), device) if batches else None
        for batch in batches:
            began = time.perf_counter()
            case = Case(model, held, context, batch, device, prefills)
            fits = context * batch <= args.hf_compiled_tokens
            here = {n: m for n, m in configs.items() if n != "hf_compiled" or fits}
            results[f"{context}x{batch}"] = rows = run_case(case, here, args)
            show(f"context {context}, batch {batch} ({time.perf_counter() - began:.0f} s)", rows, "untouched")
            write(args, results, device)
        held = case = None
        if not args.capacity:
            continue
        for kind, members in groups(configs).items():
            began = time.perf_counter()
            batch, rows = capacity_case(model, shape, context, kind, members, args, device, prefills)
            results[f"{context}xcapacity:{kind}"] = {"batch": batch, "rows": rows}
            show(
                f"context {context}, {kind} cache at capacity, batch {batch} ({time.perf_counter() - began:.0f} s)",
                rows,
                next(iter(members)),
            )
            write(args, results, device)


def write(args, results: dict, device: str) -> None:
    """The report so far, written after every case (a long run that fails keeps what it measured)."""
    if not args.json:
        return
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "settings": {
            k: getattr(args, k)
            for k in ("rounds", "steps", "warmup", "budget", "capacity", "capacity_steps", "reserve_gb")
        },
        "results": results,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
    }
    args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
