"""How much host time does attnkit add to a decode step when it changes nothing (identity) or masks 4
heads (``head_mask``)? Measured where the GPU's drift cannot hide it: on the CPU, part by part.

An eager decode step of the Llama-3-8B shape on an H200 is bound by the host: about 1,200 kernel
launches in 20-32 ms, the GPU busy for 6.5 ms of it (BENCHMARKS.md, "Decode steps"). What attnkit
adds there is host work, and the step's drift between rounds on that machine (4-80%) is larger than
the 2-3% that issue 17 allows. So this script measures that host work directly, with the model in
the 8B layout (32 layers, 32 query / 8 KV heads) at tiny widths on the CPU, one thread:

- operators dispatched per decode step (torch.profiler): each is a kernel launch on the GPU;
- attnkit's Python per step, part by part, each the best of 5 repetitions of 20,000 calls inside a
  real decode call's state: where attention is routed through attnkit (``identity_routed``: an
  empty recipe under ``Handle.routing()``, as any method acting inside attention routes it), the
  registered attention function (its ``torch.compiler.disable`` wrapper included) with its backend
  replaced by a no-op, less the no-op's call, per layer (the kernel's own time would bury a
  microsecond in noise); the model-level hooks that begin and end a call, per forward; for
  ``head_mask``, its output hook on each masked layer (its multiply included). ``identity`` and
  ``head_mask`` leave the model its own attention function, so they have no per-layer part;
- the sum against the H200's untouched eager step (``--gpu-step-ms``: the fastest median
  measured there, so the largest share);
- whole decode steps, untouched against each configuration in interleaved rounds, for what they
  show at this noise (median over rounds of a block's mean; spread = (max - min) / median).

    python scripts/bench_host_overhead.py [--rounds 10] [--steps 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import turn  # noqa: E402
from bench_tidal import FULL, buffers, build_model, decode_block, make_cache  # noqa: E402

import attnkit  # noqa: E402
from attnkit import compat  # noqa: E402
from attnkit.engine import attention  # noqa: E402
from attnkit.engine.plan import plan_for  # noqa: E402
from attnkit.methods import HeadMask  # noqa: E402

SHAPE = dict(FULL, hidden_size=256, intermediate_size=512, vocab_size=1024)
"""The 8B layout (32 layers, 32 query / 8 KV heads), widths small enough that the host dominates."""
MASKED = {8: [0, 1], 24: [2, 3]}
CONFIGS = {
    "untouched": None,
    "identity": [],
    "head_mask": [HeadMask(heads=MASKED, scale=0.0)],
    "identity_routed": [],
}
"""``*_routed``: attention routed through attnkit's function (``Handle.routing()``), as any method
acting inside attention routes it; the others leave the model its own function."""


@contextlib.contextmanager
def applied(model, name: str):
    """Configuration ``name`` applied to ``model`` (no grad); yields the handle, or None."""
    methods = CONFIGS[name]
    with torch.no_grad():
        if methods is None:
            yield None
            return
        with (
            attnkit.apply(model, methods) as handle,
            handle.routing() if name.endswith("_routed") else contextlib.nullcontext(),
        ):
            yield handle


def best_us(fn, number: int = 20000) -> float:
    """Microseconds per call: the best of 5 repetitions (noise only ever adds)."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def parts_us(model, cache, token, name: str) -> dict[str, float]:
    """attnkit's host work per decode step, part by part, measured inside a real decode call's state."""
    module = model.model.layers[0].self_attn
    heads, kv, dim = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], module.head_dim
    past = cache.get_seq_length()
    query = torch.randn(1, heads, 1, dim)
    key, value = torch.randn(1, kv, past + 1, dim), torch.randn(1, kv, past + 1, dim)
    with applied(model, name):
        kwargs = {"input_ids": token, **compat.cache_argument(model, cache), "use_cache": True}
        output = model(**kwargs)  # a first decode step: the tracker checks the cache once
        cache.crop(-1)
        (before,), (after,) = model._forward_pre_hooks.values(), model._forward_hooks.values()
        before(model, (), kwargs)  # a decode call's state, as the model's forward would begin it
        per_layer, edits = 0.0, 0.0
        try:
            implementation = compat.attn_implementation(model.config)
            if implementation.startswith(attention.NAME):  # routed: the registered function, wrapper and all
                registered = compat.ALL_ATTENTION_FUNCTIONS[implementation]
                plan, scaling = plan_for(model.config), module.scaling
                real, plan.backend = plan.backend, lambda *args, **kwargs: (query, None)  # the kernel's time left out
                try:
                    routed = best_us(lambda: registered(module, query, key, value, None, scaling=scaling))
                    dispatched = best_us(lambda: plan.backend(module, query, key, value, None, scaling=scaling))
                finally:
                    plan.backend = real
                per_layer = routed - dispatched
            for layer in MASKED if CONFIGS[name] else ():
                o_proj = model.model.layers[layer].self_attn.o_proj
                (hook,) = o_proj._forward_pre_hooks.values()
                heads_out = torch.randn(1, 1, heads * dim)
                edits += best_us(lambda hook=hook, o_proj=o_proj, x=heads_out: hook(o_proj, (x,)))
        finally:
            after(model, (), kwargs, output)

        def call_hooks():
            before(model, (), kwargs)
            after(model, (), kwargs, output)

        hooks = best_us(call_hooks)
    layers = SHAPE["num_hidden_layers"]
    return {
        "attention_us_per_layer": per_layer,
        "call_hooks_us": hooks,
        "output_edits_us": edits,
        "step_us": layers * per_layer + hooks + edits,
    }


def operators(model, name: str, cache, token, steps: int = 5) -> float:
    """Operators dispatched per decode step (torch.profiler's top-level CPU events)."""
    from torch.profiler import ProfilerActivity, profile

    with applied(model, name), profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_block(model, cache, token, steps)()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None) / steps


def block_ms(model, name: str, cache, token, steps: int) -> float:
    """The mean step of ``steps`` decode steps of configuration ``name``."""
    with applied(model, name):
        run = decode_block(model, cache, token, steps)
        began = time.perf_counter()
        run()
        return (time.perf_counter() - began) * 1e3 / steps


def rounds_ms(model, cache, token, args) -> dict[str, list[float]]:
    """Whole decode steps of every configuration, in interleaved rounds (the order rotated one place each round)."""
    out: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for name in CONFIGS:  # warm-up
        block_ms(model, name, cache, token, args.steps // 4)
    for r in range(args.rounds):
        for name in turn(CONFIGS, r):
            out[name].append(block_ms(model, name, cache, token, args.steps))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--gpu-step-ms", type=float, default=19.93, help="the H200's untouched eager step to compare with"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model(SHAPE, "cpu").float()  # the CPU's bfloat16 kernels would add compute the GPU does not wait on
    held = [(k.float(), v.float()) for k, v in buffers(SHAPE, 1, args.context + 1, "cpu")]
    cache = make_cache(model, held, 1, args.context)
    token = torch.randint(0, model.config.vocab_size, (1, 1))
    results = {}
    with torch.no_grad():
        ops = {name: operators(model, name, cache, token) for name in CONFIGS}
        parts = {name: parts_us(model, cache, token, name) for name, methods in CONFIGS.items() if methods is not None}
        rounds = rounds_ms(model, cache, token, args)
    base = statistics.median(rounds["untouched"])
    print(f"context {args.context}, batch 1, CPU, one thread; the H200's untouched eager step: {args.gpu_step_ms} ms")
    for name in CONFIGS:
        median = statistics.median(rounds[name])
        row = {
            "operators_per_step": ops[name],
            "step_ms": median,
            "ratio": median / base,
            "spread": (max(rounds[name]) - min(rounds[name])) / median,
            "rounds_ms": rounds[name],
            **parts.get(name, {}),
        }
        results[name] = row
        line = f"  {name:15s} operators/step {ops[name]:5.0f}   whole step {median:7.3f} ms ({row['ratio']:.3f}x, spread {100 * row['spread']:.0f}%)"
        if name in parts:
            p = parts[name]
            line += (
                f"   attnkit's host work {p['step_us']:6.1f} us/step = {p['attention_us_per_layer']:.2f} us x "
                f"{SHAPE['num_hidden_layers']} layers + {p['call_hooks_us']:.1f} us call hooks + "
                f"{p['output_edits_us']:.1f} us output edits: {p['step_us'] / (10 * base):.2f}% of this step, "
                f"{p['step_us'] / (10 * args.gpu_step_ms):.2f}% of the H200's"
            )
        print(line)
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        report = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
        args.json.write_text(json.dumps({**report, "settings": settings, "results": results}, indent=1))


if __name__ == "__main__":
    main()
