"""The fused sink-statistics kernels and the mask facts they rely on."""

import importlib.util

import pytest
import torch

import attnkit
from attnkit import kernels
from attnkit.engine.plan import AttentionCall
from attnkit.methods import ACT
from attnkit.methods.act import voter_counts
from attnkit.primitives import layer_window
from attnkit.recipe.methods import MethodConfig
from tests.factory import ARCHS, SUPPORTED_ATTN, left_padded_batch, tiny_model


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


needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="the kernels need Triton (installed on GPU machines)"
)


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
