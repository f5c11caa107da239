"""The fused sink-statistics kernels and the mask facts they rely on."""

import itertools
import random

import pytest
import torch

import attnkit
from attnkit import kernels
from attnkit.engine.plan import AttentionCall
from attnkit.methods import ACT
from attnkit.methods.act import voter_counts
from attnkit.primitives import layer_window, rotate
from attnkit.recipe.methods import MethodConfig
from tests.factory import ARCHS, SUPPORTED_ATTN, left_padded_batch, needs_triton, tiny_model


def captured_masks(model, **inputs):
    """The mask each layer's attention receives, as an additive float mask."""
    from attnkit.primitives import additive_mask

    masks = {}

    class Capture(attnkit.methods.Method):
        name, config_class = "capture", MethodConfig

        def __init__(self):
            super().__init__(MethodConfig(method="capture"))

        def attach(self, at):
            for layer in range(model.config.num_hidden_layers):
                at.output_edit(layer, self.keep)

        def keep(self, call: AttentionCall, output):
            masks[call.layer] = (additive_mask(call.raw_mask, call.query, call.key), call)
            return output

    with torch.no_grad(), attnkit.apply(model, [Capture()]):
        model(**inputs)
    return masks


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_window_and_voter_counts_match_the_models_mask(arch):
    """The kernels rebuild the mask as causal + padding + window: it must be the model's own."""
    model = tiny_model(arch, attn_implementation=SUPPORTED_ATTN[arch][0])
    batch = left_padded_batch([list(range(3, 19)), list(range(5, 16))], 0)
    for layer, (mask, call) in captured_masks(model, **batch).items():
        n = mask.shape[-1]
        q_pos, k_pos = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = k_pos <= q_pos
        window = layer_window(model.config, layer)
        if window:
            allowed &= q_pos - k_pos < window
        valid = batch["attention_mask"].bool()
        derived = allowed[None] & valid[:, None, :]
        real = (mask > torch.finfo(torch.float32).min / 2)[:, 0] if mask is not None else allowed[None].expand(2, n, n)
        assert torch.equal(real[valid], derived[valid]), f"layer {layer} (window {window})"
        counted = (real & valid[:, :, None]).sum(1) * valid
        assert torch.equal(voter_counts(call, valid, n, n)[:, 0], counted.clamp(min=1).float())


def test_sliding_window_archs_have_windows():
    assert layer_window(tiny_model("mistral-gqa").config, 0) == 8
    assert [layer_window(tiny_model("gemma3-gqa").config, i) for i in range(3)] == [6, 6, None]
    assert layer_window(tiny_model("llama-gqa").config, 0) is None


def reference(q, k, scale, valid, window):
    b, h, m, d = q.shape
    n = k.shape[2]
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    q_pos, k_pos = torch.arange(m)[:, None] + n - m, torch.arange(n)[None, :]
    ok = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window else True)
    ok = ok[None, None].expand(b, h, m, n).clone()
    q_valid = torch.ones(b, m, dtype=torch.bool)
    if valid is not None:
        ok &= valid[:, None, None, :].bool()
        q_valid = valid[:, n - m :].bool()
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    probs = torch.exp(s - lse[..., None]).nan_to_num(0) * q_valid[:, None, :, None]
    return lse, probs.sum(2)


@needs_triton
@pytest.mark.parametrize(
    "m,n,window,pad",
    [(70, 70, 0, False), (70, 70, 0, True), (130, 130, 20, True), (3, 100, 0, True), (1, 90, 16, False)],
)
def test_kernels_equal_reference(m, n, window, pad):
    torch.manual_seed(m + n)
    q, k = torch.randn(2, 3, m, 32), torch.randn(2, 3, n, 32)
    valid = None
    if pad:
        valid = torch.ones(2, n, dtype=torch.long)
        valid[1, :5] = 0
    lse, sums = kernels.sink_stats(q, k, 0.3, valid, window, True)
    ref_lse, ref_sums = reference(q, k, 0.3, valid, window)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    assert (lse[~finite] == float("inf")).all()
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("arch", ["llama-gqa", "mistral-gqa", "gemma3-gqa"])
def test_act_fast_path_through_kernels_matches_eager(arch, monkeypatch):
    model = tiny_model(arch)
    batch = left_padded_batch([[5, 9, 17, 33, 4, 8, 21, 60, 7, 11, 3, 90], [12, 40, 3, 77, 15, 6, 44]], 0)
    heads = {1: [0, 2], 2: [1, 3]}
    with torch.no_grad(), attnkit.apply(model, [ACT(heads=heads, path="eager")]) as handle:
        eager = model(**batch).logits
        eager_sinks = handle.stats()["act"]["sinks_found"]
    monkeypatch.setattr(kernels, "available", lambda query: True)
    with torch.no_grad(), attnkit.apply(model, [ACT(heads=heads, path="fast")]) as handle:
        fused = model(**batch).logits
        assert handle.stats()["act"]["sinks_found"] == eager_sinks > 0
    rows = batch["attention_mask"].bool()
    torch.testing.assert_close(fused[rows], eager[rows], rtol=1e-3, atol=1e-3)


def block_reference(query, positions, table, keys, value, blocks, scale, valid, open_groups):
    """Block-rotated attention written out: every query rotated per block, every logit read from
    its key's block, the mask built whole."""
    cos, sin = table
    key = torch.cat(keys, 2).double()
    batch, heads, rows, dim = query.shape
    group = heads // value.shape[1]
    key, val = key.repeat_interleave(group, 1), value.double().repeat_interleave(group, 1)
    at = positions.expand(batch, heads, rows, positions.shape[-1])
    turned = rotate(query.double()[:, :, :, None], cos.double()[at], sin.double()[at])  # [b, h, m, V, d]
    every = torch.einsum("bhmvd,bhnd->bhmvn", turned, key) * scale
    pick = blocks[:, None, None, None, :].expand(batch, heads, rows, 1, key.shape[2])
    scores = every.gather(3, pick).squeeze(3)
    count = key.shape[2]
    ok = torch.arange(count)[None, :] <= torch.arange(rows)[:, None] + count - rows
    ok = ok[None, None].expand(batch, heads, rows, count).clone()
    if open_groups is not None:
        gq, gk = open_groups
        ok |= ((gq[:, :, None] > 0) & (gk[:, None, :] > 0) & (gq[:, :, None] != gk[:, None, :]))[:, None]
    if valid is not None:
        ok &= valid[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~ok, float("-inf")), -1).nan_to_num(0)
    return probs @ val


@needs_triton
@pytest.mark.parametrize(
    "rows,count,heads,kv_heads,split,pad,opened",
    [(40, 40, 4, 2, 40, False, True), (70, 150, 2, 1, 120, True, True), (1, 90, 8, 2, 60, True, False),
     (3, 33, 2, 2, 33, False, False), (300, 300, 2, 1, 250, False, True), (300, 300, 2, 1, 300, False, False)],
)  # fmt: skip
@pytest.mark.parametrize("runs", ["sorted", "scattered"])
def test_block_attention_equals_reference(rows, count, heads, kv_heads, split, pad, opened, runs):
    torch.manual_seed(rows + count)
    batch, dim, table_length = 2, 32, 400
    angles = torch.arange(table_length, dtype=torch.float64)[:, None] * 0.3 ** torch.arange(dim // 2)
    angles = torch.cat([angles, angles], -1)
    table = (angles.cos() * 1.1, angles.sin() * 1.1)
    query = torch.randn(batch, heads, rows, dim, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, count, dim, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, count, dim, dtype=torch.float64)
    blocks = torch.randint(0, 4, (batch, count))
    blocks = blocks.sort(-1).values if runs == "sorted" else blocks  # scattered: blocks read whole, masked
    positions = torch.randint(0, table_length, (batch, heads, rows, 4))
    valid = torch.ones(batch, count, dtype=torch.bool)
    if pad:
        valid[1, :7] = False
    groups = None
    if opened:
        groups = (torch.randint(0, 3, (batch, rows)), blocks * (blocks < 3))
    keys = (key[:, :, :split], key[:, :, split:])
    out = kernels.block_attention(query, positions, table, keys, value, blocks, 0.7, valid if pad else None, groups)
    expected = block_reference(query, positions, table, keys, value, blocks, 0.7, valid if pad else None, groups)
    assert torch.allclose(out, expected, atol=1e-10), (out - expected).abs().max()
    # the keys split over programs, as for a decode step, and combined
    args = (query, positions, table, keys, value, blocks, 0.7, valid if pad else None, groups)
    split_up = kernels.block_attention(*args, config={"SPLITS": 4, "SPLIT_KEYS": -(-count // 4), "BM": 16})
    assert torch.allclose(split_up, expected, atol=1e-10), (split_up - expected).abs().max()
    # every run in tiles of BN, its last keys too (runs of 10 and 37 keys took the half and the whole tail)
    untailed = kernels.block_attention(*args, config={"TAIL": 0})
    assert torch.allclose(untailed, expected, atol=1e-10), (untailed - expected).abs().max()
    # the table's equal halves given once
    halved = kernels.block_attention(query, positions, tuple(t[:, : dim // 2] for t in table), *args[3:])
    assert torch.allclose(halved, expected, atol=1e-10), (halved - expected).abs().max()


@needs_triton
@pytest.mark.parametrize("splits", [1, 4])
def test_block_attention_reads_a_filled_length_from_the_device(splits):
    """A preallocated cache (a captured decode step): with ``length`` on the device, the query sits
    at that key index and the slots after it are never read, whatever they hold."""
    torch.manual_seed(splits)
    batch, heads, kv_heads, dim, filled, capacity = 2, 4, 2, 32, 50, 80
    angles = torch.arange(200, dtype=torch.float64)[:, None] * 0.3 ** torch.arange(dim // 2)
    angles = torch.cat([angles, angles], -1)
    table = (angles.cos(), angles.sin())
    query = torch.randn(batch, heads, 1, dim, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, capacity, dim, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, capacity, dim, dtype=torch.float64)
    key[:, :, filled:], value[:, :, filled:] = float("nan"), float("nan")  # unfilled slots: never read
    blocks = torch.randint(0, 3, (batch, capacity)).sort(-1).values
    positions = torch.randint(0, 200, (batch, heads, 1, 3))
    valid = torch.ones(batch, capacity, dtype=torch.bool)
    valid[1, :5] = False
    config = {"SPLITS": splits, "SPLIT_KEYS": -(-capacity // splits), "BM": 16}
    keys = (key[:, :, :30], key[:, :, 30:])
    out = kernels.block_attention(
        query, positions, table, keys, value, blocks, 0.7, valid, config=config, length=torch.tensor([filled])
    )
    parts = (key[:, :, :30], key[:, :, 30:filled])
    expected = block_reference(
        query, positions, table, parts, value[:, :, :filled], blocks[:, :filled], 0.7, valid[:, :filled], None
    )
    assert torch.allclose(out, expected, atol=1e-10), (out - expected).abs().max()


def order_reference(query, keys, segments, lengths, base, active, scale):
    """PINE's reader order written out: per row and head, importance by softmax over segment keys,
    then each segment moved back by the lengths of those ranked ahead (stable: ties in order)."""
    batch, heads, rows, _ = query.shape
    keys = keys.double().repeat_interleave(heads // keys.shape[1], 1)
    count = lengths.shape[1]
    out = torch.zeros(batch, heads, rows, count + 2, dtype=torch.long)
    for b, h, m in itertools.product(range(batch), range(heads), range(rows)):
        inside = segments[b] > 0
        probs = torch.softmax((keys[b, h] @ query[b, h, m].double())[inside] * scale, 0)
        importance = [
            float(probs[segments[b][inside] == s].sum()) / max(int(lengths[b, s - 1]), 1) for s in range(1, count + 1)
        ]
        order = sorted(range(count), key=lambda s: -importance[s])  # stable
        moved, ahead = [0] * count, 0
        for s in order:
            moved[s], ahead = ahead, ahead + int(lengths[b, s])
        moved = [x * int(active[b]) for x in moved]
        out[b, h, m] = torch.tensor([0, *moved, 0]) + int(base[b, m])
    return out


@needs_triton
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("rows,heads,kv_heads,count", [(1, 4, 2, 3), (5, 2, 2, 20), (3, 8, 1, 2)])
def test_segment_order_equals_reference(rows, heads, kv_heads, count, splits):
    """One pass, and the keys split in three (the second row's last splits hold no segment key)."""
    torch.manual_seed(rows * 10 + count)
    batch, dim, prompt = 2, 32, 90
    query = torch.randn(batch, heads, rows, dim, dtype=torch.float64)
    keys = torch.randn(batch, kv_heads, prompt, dim, dtype=torch.float64)
    segments = torch.zeros(batch, prompt, dtype=torch.long)
    cuts = sorted(random.Random(count).sample(range(5, 80), count))
    for number, (start, end) in enumerate(zip(cuts, [*cuts[1:], 85]), start=1):
        segments[0, start:end] = number
    segments[1, 10:40], segments[1, 40:41] = 1, 2  # fewer segments in the second row
    lengths = torch.stack([(segments == s).sum(-1) for s in range(1, count + 1)], -1)
    base = torch.randint(0, 50, (batch, rows))
    active = torch.tensor([1, 0 if count == 2 else 1])
    got = kernels.segment_order(query, keys, segments, lengths, base, active, 0.4, splits=splits)
    assert torch.equal(got.long(), order_reference(query, keys, segments, lengths, base, active, 0.4))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rotate_kernel_equals_the_torch_rotation(dtype):
    """One pass of RoPE (the positions stage's un-rotated query) equals primitives.rotate, computed in
    float32 or wider and written in the query's dtype; the query as transformers hands it (heads
    transposed out of the token axis) and cos/sin of one head broadcast over all."""
    torch.manual_seed(0)
    batch, heads, n, dim = 2, 4, 37, 32
    query = torch.randn(batch, n, heads, dim, dtype=torch.float64).to(dtype).transpose(1, 2)
    angles = torch.rand(batch, 1, n, dim // 2, dtype=torch.float64) * 6
    angles = torch.cat([angles, angles], -1)
    wide = torch.promote_types(dtype, torch.float32)
    cos, sin = (angles.cos() * 1.2).to(wide), (angles.sin() * 1.2).to(wide)
    expected = rotate(query.to(wide), cos, sin).to(dtype)
    got = kernels.rotate(query, cos, sin, dtype)
    assert got.dtype == dtype and got.shape == expected.shape
    tolerance = 1e-12 if dtype == torch.float64 else 1e-2
    assert torch.allclose(got.double(), expected.double(), atol=tolerance, rtol=tolerance)
