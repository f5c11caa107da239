"""The flash-decoding kernel (``attnkit.kernels.decode``) against a float64 torch reference, in
Triton's interpreter on the CPU; on CUDA, against sdpa at a real shape and under CUDA-graph replay.

Cache slots the kernel must not read (past a row's length, before its window, padding) hold NaN
where the test allows it, so a read of one shows up in the output."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None, reason="the kernel needs Triton (its interpreter on CPU)"
    ),
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log2"),  # the interpreter's log2(0) = -inf
]

if importlib.util.find_spec("triton") is not None:
    from attnkit.kernels.decode import decode_attention


def readable_slots(query, keys, lengths, valid=None, window=None, index=None):
    """The slots each query head reads, bool [batch, heads, capacity]: filled, not padding, in the
    window and, given an index [batch, kv heads or heads, n], listed for the head (-1: none)."""
    batch, heads = query.shape[:2]
    capacity = keys.shape[2]
    length = lengths.expand(batch)[:, None, None]
    column = torch.arange(capacity)
    readable = column < length  # [batch, 1, capacity]
    if valid is not None:
        readable = readable & (valid[:, None, :capacity] != 0)
    if window is not None:
        readable = readable & (column >= length - window)
    if index is not None:
        index = index.long().expand(batch, -1, -1)
        at = torch.where((index >= 0) & (index < capacity), index, capacity)  # the rest: a spare column
        listed = torch.zeros(batch, index.shape[1], capacity + 1, dtype=torch.bool).scatter_(2, at, True)
        readable = readable & listed[..., :capacity].repeat_interleave(heads // index.shape[1], 1)
    return readable.expand(batch, heads, capacity)


def reference(query, keys, values, lengths, scale, valid=None, window=None, softcap=None, index=None, lse=False):
    """softmax(scale q·kᵀ) v in float64 over the readable slots, masks built explicitly; NaN in
    unreadable slots is ignored; a row that reads nothing gets 0. [batch, 1, heads, dim]; given
    ``lse``, also the logits' log-sum-exp [batch, heads] (-inf for a row that reads nothing)."""
    heads, kv_heads = query.shape[1], keys.shape[1]
    keep = readable_slots(query, keys, lengths, valid, window, index)[..., None]  # [batch, heads, capacity, 1]
    k = torch.where(keep, keys.double().repeat_interleave(heads // kv_heads, 1), 0.0)
    v = torch.where(keep, values.double().repeat_interleave(heads // kv_heads, 1), 0.0)
    logits = scale * query.double() @ k.transpose(-1, -2)  # [batch, heads, 1, capacity]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~keep.transpose(-1, -2), float("-inf"))
    weights = torch.softmax(logits, -1).nan_to_num(0.0)
    out = (weights @ v).transpose(1, 2)
    return (out, logits.logsumexp(-1)[..., 0]) if lse else out


def inputs(batch, heads, kv_heads, dim, capacity, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, 1, dim, generator=g).mul(2).to(dtype)
    keys = torch.randn(batch, kv_heads, capacity, dim, generator=g).to(dtype)
    values = torch.randn(batch, kv_heads, capacity, dim, generator=g).to(dtype)
    return query, keys, values


def poison(cache, readable):
    """NaN in the slots that no query head of a KV head reads (``readable`` [batch, heads,
    capacity]): past each row's length, before its window, padding, not listed."""
    batch, kv_heads, capacity = cache.shape[:3]
    read = readable.reshape(batch, kv_heads, -1, capacity).any(2)
    return cache.masked_fill(~read[..., None], float("nan"))


def check(query, keys, values, lengths, scale, tol=1e-4, splits=None, **kwargs):
    """The kernel against the reference, every unreadable slot of the cache NaN, its output and
    log-sum-exp (``return_lse``, the output the same as without); returns both."""
    expected, expected_lse = reference(query, keys, values, lengths, scale, lse=True, **kwargs)
    masks = {name: kwargs.get(name) for name in ("valid", "window", "index")}
    readable = readable_slots(query, keys, lengths, **masks)
    keys, values = poison(keys, readable), poison(values, readable)
    got = decode_attention(query, keys, values, lengths, scale, splits=splits, **kwargs)
    assert got.shape == expected.shape and got.dtype == values.dtype and got.is_contiguous()
    assert not got.isnan().any()
    error = ((got.double() - expected).abs().max() / expected.abs().max()).item()
    assert error < tol, error
    with_lse, lse = decode_attention(query, keys, values, lengths, scale, splits=splits, return_lse=True, **kwargs)
    assert torch.equal(with_lse, got)
    assert lse.shape == expected_lse.shape and lse.dtype == torch.float32
    assert (lse == float("-inf")).equal(~readable.any(-1))  # -inf exactly where a head reads nothing
    torch.testing.assert_close(lse.double(), expected_lse, rtol=tol, atol=tol)
    return got, lse


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 2, 64), (4, 4, 32), (4, 1, 32)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("splits", [1, 4])
def test_lengths_per_row(heads, kv_heads, dim, splits):
    """Rows of lengths 5 and 37 in a cache of 48: with 4 splits of 12 keys, row 0 ends inside the
    first split and its other three lie past the length; row 1 ends inside the fourth."""
    query, keys, values = inputs(2, heads, kv_heads, dim, 48)
    check(query, keys, values, torch.tensor([5, 37]), 1 / math.sqrt(dim), splits=splits)


def test_default_splits_and_int32_lengths():
    query, keys, values = inputs(3, 4, 2, 64, 40, seed=1)
    check(query, keys, values, torch.tensor([40, 1, 23], dtype=torch.int32), 0.125)


def test_lengths_of_one_broadcast_and_splits_not_a_power_of_two():
    """One length for the whole batch; 3 splits run as 4, the fourth empty."""
    query, keys, values = inputs(2, 4, 2, 32, 24, seed=2)
    check(query, keys, values, torch.tensor([17]), 0.2, splits=3)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float32])
def test_left_padding_and_a_row_with_nothing_to_read(dtype):
    """A left-padded batch's 2-D mask (longer than the cache: its first columns count); row 2's
    every slot is padding, so it gets zeros, not NaN."""
    query, keys, values = inputs(3, 8, 2, 64, 32, seed=3)
    valid = torch.ones(3, 40, dtype=dtype)
    valid[0, :6] = 0
    valid[1, 3:9] = 0
    valid[2] = 0
    got, lse = check(query, keys, values, torch.tensor([20, 32, 12]), 0.125, valid=valid, splits=2)
    assert (got[2] == 0).all() and (lse[2] == float("-inf")).all() and lse[:2].isfinite().all()


@pytest.mark.parametrize("window", [1, 10, 100])
def test_window(window):
    """A window that keeps the last key only, one that starts inside a split and one past the start."""
    query, keys, values = inputs(2, 4, 2, 32, 48, seed=4)
    check(query, keys, values, torch.tensor([30, 47]), 0.2, window=window, splits=4)


@pytest.mark.parametrize("splits", [1, 2])
def test_window_and_softcap_with_padding(splits):
    """Gemma 2's mask and soft-capping together; large logits so that the cap bites."""
    query, keys, values = inputs(2, 8, 4, 64, 32, seed=5)
    valid = torch.ones(2, 32, dtype=torch.bool)
    valid[0, :4] = False
    lengths = torch.tensor([25, 9])
    got, lse = check(query * 20, keys, values, lengths, 0.125, splits=splits, window=8, softcap=5.0, valid=valid)
    plain, plain_lse = decode_attention(
        query * 20, keys, values, lengths, 0.125, window=8, valid=valid, splits=splits, return_lse=True
    )
    assert (got - plain).abs().max() > 1e-2 and (lse - plain_lse).abs().max() > 1  # the cap changed the result
    assert lse.max() <= 5.0 + math.log(8)  # at most 8 keys, each logit capped at 5


def test_bfloat16():
    query, keys, values = inputs(2, 8, 2, 64, 48, dtype=torch.bfloat16, seed=6)
    check(query, keys, values, torch.tensor([48, 20]), 0.125, tol=2e-2, splits=4)


def test_strided_cache_and_transposed_query():
    """Keys and values sliced from bigger buffers (heads, slots and features), the query a
    transposed view of a [batch, 1, heads, dim] projection."""
    g = torch.Generator().manual_seed(7)
    query = torch.randn(2, 1, 16, 64, generator=g)[:, :, ::2].transpose(1, 2)
    keys = torch.randn(2, 3, 40, 80, generator=g)[:, :2, 4:36, 8:72]
    values = torch.randn(2, 2, 64, 80, generator=g)[:, :, ::2, 16:]
    assert not (keys.is_contiguous() or values.is_contiguous() or query.is_contiguous())
    lengths = torch.tensor([32, 13])
    expected = reference(query, keys, values, lengths, 0.125)
    got = decode_attention(query, keys, values, lengths, 0.125, splits=2)
    assert ((got.double() - expected).abs().max() / expected.abs().max()) < 1e-4


def test_equals_sdpa_on_the_filled_part():
    query, keys, values = inputs(1, 8, 2, 64, 48, seed=8)
    got = decode_attention(query, keys, values, torch.tensor([29]), 0.125, splits=4)
    expected = F.scaled_dot_product_attention(
        query, keys[:, :, :29], values[:, :, :29], scale=0.125, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_unsupported_head_dim():
    query, keys, values = inputs(1, 2, 1, 48, 16)
    with pytest.raises(ValueError, match="head dim 48"):
        decode_attention(query, keys, values, torch.tensor([4]), 0.1)


def listing(batch, units, n, slots, seed, pad_every=5, dtype=torch.int64):
    """An index [batch, units, n]: n distinct slots in random order from ``slots`` (a count, or a
    list of the slots to draw from), every ``pad_every``-th entry -1 (padding)."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.arange(slots) if isinstance(slots, int) else torch.as_tensor(slots)
    index = torch.stack([slots[torch.randperm(len(slots), generator=g)[:n]] for _ in range(batch * units)])
    index = index.view(batch, units, n)
    index[..., ::pad_every] = -1
    return index.to(dtype)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "per"),
    [(8, 2, "kv_head"), (8, 2, "head"), (4, 1, "kv_head"), (4, 1, "head"), (4, 4, "head")],
    ids=["gqa-kv_head", "gqa-head", "mqa-kv_head", "mqa-head", "mha"],
)
@pytest.mark.parametrize("splits", [1, 3, 5])
def test_index(heads, kv_heads, per, splits):
    """Sparse reads, a list per KV head (int64) or per query head (int32; for MHA the same), of 24 slots from a cache
    of 48: -1 entries, slots past the length (rows of 40, 17 and 30) and padding ones. Row 2 lists
    only unreadable slots: zeros. 3 splits run as 4 of 8 entries (the fourth past the list), 5 as
    8 of 5 (the fifth ends past the list, the last three start past it)."""
    query, keys, values = inputs(3, heads, kv_heads, 32, 48, seed=9)
    valid = torch.ones(3, 48, dtype=torch.bool)
    valid[0, 3:9] = False
    valid[2, :10] = False
    units, dtype = (kv_heads, torch.int64) if per == "kv_head" else (heads, torch.int32)
    index = listing(3, units, 24, 48, seed=10, dtype=dtype)
    index[2] = listing(1, units, 24, [*range(10), *range(30, 48)], seed=11, dtype=dtype)[0]
    readable = readable_slots(query, keys, torch.tensor([40, 17, 30]), valid, index=index)
    assert readable[:2].sum(-1).min() > 0 and not readable[2].any()
    got, lse = check(query, keys, values, torch.tensor([40, 17, 30]), 0.2, valid=valid, index=index, splits=splits)
    assert (got[2] == 0).all() and (lse[2] == float("-inf")).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_with_strided_cache_and_index(dtype):
    """Keys and values sliced from bigger buffers, the unread slots NaN there; a transposed index
    list per query head, one for the whole batch (batch stride 0), and the default splits."""
    g = torch.Generator().manual_seed(12)
    query = torch.randn(2, 1, 16, 64, generator=g)[:, :, ::2].transpose(1, 2).to(dtype)
    keys = torch.randn(2, 3, 40, 80, generator=g).to(dtype)[:, :2, 4:36, 8:72]
    values = torch.randn(2, 2, 64, 80, generator=g).to(dtype)[:, :, ::2, 16:]
    index = listing(1, 8, 20, 32, seed=13).mT.contiguous().mT.expand(2, -1, -1)  # [2, 8 heads, 20]
    lengths = torch.tensor([32, 13])
    readable = readable_slots(query, keys, lengths, index=index)
    keys.copy_(poison(keys, readable))
    values.copy_(poison(values, readable))
    assert not (keys.is_contiguous() or values.is_contiguous() or index.is_contiguous())
    expected, expected_lse = reference(query, keys, values, lengths, 0.125, index=index, lse=True)
    got, lse = decode_attention(query, keys, values, lengths, 0.125, index=index, return_lse=True)
    assert got.dtype == dtype and not got.isnan().any()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((got.double() - expected).abs().max() / expected.abs().max()) < tol
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("per", ["kv_head", "head"])
def test_index_of_the_filled_slots_equals_the_contiguous_read(per):
    """An index listing exactly each row's slots [0, length), shuffled, padded with -1 to the
    capacity: the contiguous read's result, up to rounding (padding and soft-capping on; two
    splits of 80 entries, two tiles each)."""
    query, keys, values = inputs(3, 8, 2, 64, 160, seed=14)
    lengths = torch.tensor([160, 97, 7])
    valid = torch.ones(3, 160, dtype=torch.bool)
    valid[1, :5] = False
    units = 2 if per == "kv_head" else 8
    g = torch.Generator().manual_seed(15)
    index = torch.full((3, units, 160), -1)
    for row, length in enumerate(lengths.tolist()):
        for unit in range(units):
            index[row, unit, :length] = torch.randperm(length, generator=g)
    kwargs = {"valid": valid, "softcap": 5.0, "splits": 2, "return_lse": True}
    contiguous = decode_attention(query, keys, values, lengths, 0.125, **kwargs)
    gathered = decode_attention(query, keys, values, lengths, 0.125, index=index, **kwargs)
    torch.testing.assert_close(gathered, contiguous, rtol=1e-5, atol=1e-6)  # outputs and log-sum-exps


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_bias_weighs_slots_and_minus_infinity_empties_them(splits, softcap):
    """A compressed cache's slot biases: added to the logits after the soft-cap (log n: the slot
    counts as n tokens), -inf: an empty slot, never read (NaN there changes nothing)."""
    query, keys, values = inputs(2, 8, 2, 32, 40)
    lengths = torch.tensor([33, 40])
    bias = torch.zeros(2, 2, 40)
    bias[:, :, 3] = math.log(7.0)
    bias[0, 1, 5:9] = float("-inf")
    keys[0, 1, 5:9], values[0, 1, 5:9] = float("nan"), float("nan")
    got = decode_attention(query, keys, values, lengths, 0.3, softcap=softcap, splits=splits, bias=bias)
    readable = readable_slots(query, keys, lengths)
    k = keys.double().nan_to_num(0.0).repeat_interleave(4, 1)
    v = values.double().nan_to_num(0.0).repeat_interleave(4, 1)
    logits = 0.3 * query.double() @ k.transpose(-1, -2)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits + bias.double().repeat_interleave(4, 1)[:, :, None, :]
    logits = logits.masked_fill(~readable[:, :, None, :], float("-inf"))
    expected = (torch.softmax(logits, -1) @ v).transpose(1, 2)
    assert not got.isnan().any()
    assert (got.double() - expected).abs().max() < 1e-5
    with pytest.raises(ValueError, match="bias"):
        decode_attention(query, keys, values, lengths, 0.3, bias=bias[:, :, :20])


def test_index_errors():
    query, keys, values = inputs(1, 4, 2, 32, 16)
    lengths, index = torch.tensor([8]), torch.zeros(1, 2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="window"):
        decode_attention(query, keys, values, lengths, 0.1, window=4, index=index)
    for wrong in (torch.zeros(1, 3, 4, dtype=torch.int64), index.float(), index[0], index.expand(2, -1, -1)):
        with pytest.raises(ValueError, match="index"):
            decode_attention(query, keys, values, lengths, 0.1, index=wrong)


def cuda_inputs(batch, heads, kv_heads, dim, capacity, rows):
    """Seeded bf16 query, keys and values on the GPU, and int32 lengths ``rows``."""
    torch.manual_seed(0)
    query = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16) * 2
    keys = torch.randn(batch, kv_heads, capacity, dim, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(batch, kv_heads, capacity, dim, device="cuda", dtype=torch.bfloat16)
    return query, keys, values, torch.tensor(rows, device="cuda", dtype=torch.int32)


def captured(call):
    """``call`` captured in a CUDA graph after a warm-up run (Triton compiles outside the capture):
    the graph and the output tensor its replays write."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    return graph, out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_against_sdpa_and_under_graph_replay():
    """The compiled kernel at Llama-3-8B's shape in bf16 against sdpa on each row's filled part,
    then captured in a CUDA graph and replayed after the lengths changed in place."""
    batch, heads, kv_heads, dim, capacity = 2, 32, 8, 128, 4096
    query, keys, values, lengths = cuda_inputs(batch, heads, kv_heads, dim, capacity, [4000, 1234])
    scale = dim**-0.5

    def expected(rows):
        out = [
            F.scaled_dot_product_attention(
                query[b : b + 1], keys[b : b + 1, :, :n], values[b : b + 1, :, :n], scale=scale, enable_gqa=True
            )
            if n
            else torch.zeros_like(query[:1])
            for b, n in enumerate(rows)
        ]
        return torch.cat(out).transpose(1, 2)

    def close(got, rows):
        want = expected(rows)
        exact = reference(query.cpu(), keys.cpu(), values.cpu(), torch.tensor(rows), scale).cuda()
        assert not got.isnan().any()
        # as close to the float64 result as sdpa's bf16 output is, give or take bf16's rounding
        torch.testing.assert_close(got, want, rtol=2e-2, atol=4e-3)
        assert (got.double() - exact).abs().max() <= 2 * (want.double() - exact).abs().max() + 4e-3

    close(decode_attention(query, keys, values, lengths, scale), [4000, 1234])

    graph, out = captured(lambda: decode_attention(query, keys, values, lengths, scale))
    for rows in ([17, 4096], [4000, 1234], [0, 300]):
        lengths.copy_(torch.tensor(rows))
        graph.replay()
        torch.cuda.synchronize()
        close(out, rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("per", ["kv_head", "head"])
def test_gathered_on_cuda_against_sdpa_and_under_graph_replay(per):
    """Sparse reads of 2048 of 8192 slots (1 in 8 entries -1, many past the length), a list per KV
    head or per query head, in bf16 at Llama-3-8B's head shape against sdpa over the gathered
    slots; then under CUDA-graph replay after the index and the lengths changed in place."""
    batch, heads, kv_heads, dim, capacity, n = 2, 32, 8, 128, 8192, 2048
    units = kv_heads if per == "kv_head" else heads
    query, keys, values, lengths = cuda_inputs(batch, heads, kv_heads, dim, capacity, [8000, 3000])
    scale = dim**-0.5

    def listing(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        rows = [torch.randperm(capacity, generator=g, device="cuda")[:n] for _ in range(batch * units)]
        index = torch.stack(rows).view(batch, units, n).int()
        index[..., ::8] = -1
        return index

    def expected(index, rows, dtype, lse=False):
        """Gather each head's listed slots, then sdpa (bf16) or an explicit softmax (float64);
        given ``lse``, torch.logsumexp of the float64 logits [batch, heads] instead."""
        at = index.long().clamp(min=0).repeat_interleave(heads // units, 1)[..., None].expand(-1, -1, -1, dim)
        k, v = (t.repeat_interleave(heads // kv_heads, 1).gather(2, at).to(dtype) for t in (keys, values))
        length = torch.tensor(rows, device="cuda")[:, None, None]
        keep = ((index >= 0) & (index < length)).repeat_interleave(heads // units, 1)[:, :, None, :]
        if dtype == torch.float64:
            logits = (scale * query.double() @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf"))
            if lse:
                return logits.logsumexp(-1)[..., 0]
            out = torch.softmax(logits, -1) @ v
        else:
            out = F.scaled_dot_product_attention(query, k, v, attn_mask=keep, scale=scale)
        return torch.where(keep.any(-1, keepdim=True), out, 0.0).transpose(1, 2)  # sdpa's empty rows aren't 0

    def close(got, index, rows):
        want, exact = expected(index, rows, torch.bfloat16), expected(index, rows, torch.float64)
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=4e-3)
        assert (got.double() - exact).abs().max() <= 2 * (want.double() - exact).abs().max() + 4e-3

    index = listing(1)
    close(decode_attention(query, keys, values, lengths, scale, index=index), index, [8000, 3000])
    out, lse = decode_attention(query, keys, values, lengths, scale, index=index, return_lse=True)
    close(out, index, [8000, 3000])
    want = expected(index, [8000, 3000], torch.float64, lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (batch, heads)
    torch.testing.assert_close(lse.double(), want, rtol=1e-3, atol=1e-3)

    graph, out = captured(lambda: decode_attention(query, keys, values, lengths, scale, index=index))
    for seed, rows in ((2, [8192, 17]), (3, [4000, 1234]), (4, [0, 8192])):
        index.copy_(listing(seed))
        lengths.copy_(torch.tensor(rows))
        graph.replay()
        torch.cuda.synchronize()
        close(out, index, rows)
