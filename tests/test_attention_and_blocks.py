"""SlidingWindowAttention against a dense softmax reference; PersistentMemory; MemoryGate."""

import math

import pytest
import torch
from fla.models.utils import Cache
from layer_helpers import decode_token_by_token, padding_call

from titans_layers.modules import MemoryGate, PersistentMemory, SlidingWindowAttention
from titans_layers.modules.sliding_window_attention import flash_attn_varlen_func, rotary
from titans_layers.testing import assert_close, relative_error

D, H, HK = 32, 4, 2


def dense_reference(layer, x, prefix=None, prefix_positions=None):
    """Softmax attention with an explicit [T, T] window mask (and prefix keys)."""
    B, T, _ = x.shape
    d, W, groups = layer.head_dim, layer.window_size, layer.num_heads // layer.num_kv_heads
    positions = torch.arange(T).expand(B, T)
    q = rotary(layer.q_proj(x).unflatten(-1, (layer.num_heads, d)), positions, layer.rope_base)
    k = rotary(layer.k_proj(x).unflatten(-1, (layer.num_kv_heads, d)), positions, layer.rope_base)
    v = layer.v_proj(x).unflatten(-1, (layer.num_kv_heads, d))
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    t = torch.arange(T)
    mask = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - W)  # [T, T]
    if prefix is not None:
        pk = layer.k_proj(prefix).unflatten(-1, (layer.num_kv_heads, d)).repeat_interleave(groups, 2)
        pv = layer.v_proj(prefix).unflatten(-1, (layer.num_kv_heads, d)).repeat_interleave(groups, 2)
        k, v = torch.cat([pk.expand(B, -1, -1, -1), k], 1), torch.cat([pv.expand(B, -1, -1, -1), v], 1)
        mask = torch.cat([prefix_positions[None, :] <= t[:, None], mask], dim=1)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    attn = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return layer.o_proj(torch.einsum("bhts,bshd->bthd", attn, v).flatten(-2))


def make(window=5, **kw):
    torch.manual_seed(0)
    return SlidingWindowAttention(D, H, window, num_kv_heads=HK, layer_idx=0, **kw)


def x_(B=2, T=13, seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("window", [1, 3, 5, 40])
def test_matches_dense_reference(window):
    layer = make(window)
    x = x_()
    o, attn, _ = layer(x)
    assert attn is None
    assert_close("output", o, dense_reference(layer, x), 1e-5)


def test_prefix_tokens_follow_their_positions():
    """Persistent tokens (-1) are visible everywhere, retrieved token i only from position i on."""
    layer = make(3)
    x, prefix = x_(), torch.randn(1, 4, D)
    positions = torch.tensor([-1, -1, 2, 7])
    o, _, _ = layer(x, prefix_states=prefix, prefix_positions=positions)
    assert_close("output", o, dense_reference(layer, x, prefix, positions), 1e-5)


@pytest.mark.parametrize("prefill", [1, 4, 9])
def test_cached_decoding_equals_full_forward(prefill):
    layer = make(4).eval()
    x = x_()
    with torch.no_grad():
        full, _, _ = layer(x)
    decoded, cache = decode_token_by_token(layer, x, prefill)
    assert_close("decoded", decoded, full, 1e-5)
    state = cache[0]["recurrent_state"]
    assert state.k.shape == (2, 3, HK, layer.head_dim), "the KV cache keeps only the window"


def test_padding_and_packing_equal_separate_sequences():
    layer = make(4)
    x = x_(B=2, T=13)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :6] = 0
    o, _, _ = layer(x, attention_mask=mask)
    alone, _, _ = layer(x[1:, 6:])
    assert_close("left-padded row", o[1:, 6:], alone, 1e-5)
    cu = torch.tensor([0, 4, 4, 13])
    packed, _, _ = layer(x[:1], cu_seqlens=cu)
    a, _, _ = layer(x[:1, :4])
    b, _, _ = layer(x[:1, 4:])
    assert_close("packed", packed, torch.cat([a, b], dim=1), 1e-5)
    o.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(window_size=0), "`window_size`"), (dict(num_kv_heads=3), "`num_kv_heads`"),
    (dict(num_heads=5), "divisible by `num_heads`"), (dict(head_dim=0), "`head_dim`"),
    (dict(rope_base=0.0), "`rope_base`"), (dict(rope_base=-5.0), "`rope_base`"),
    (dict(rope_base=float("inf")), "`rope_base`"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    args = dict(hidden_size=D, num_heads=H, window_size=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SlidingWindowAttention(**args)
    layer = make(4)
    with pytest.raises(ValueError, match="`prefix_states`"):
        layer(x_(), prefix_states=torch.randn(3, 2, D))
    with pytest.raises(ValueError, match="`prefix_positions`"):
        layer(x_(), prefix_states=torch.randn(1, 2, D), prefix_positions=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="`hidden_states` is torch.float16 but the weights are torch.float32"):
        layer(x_().half())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(B=2, cu=[0, 4, 26]), ValueError, "`cu_seqlens`.*batch size 1"),
    (dict(cu=[2, 4, 13]), ValueError, "`cu_seqlens` must start at 0"),
    (dict(cu=[0, 4, 15]), ValueError, "`cu_seqlens` must end at T = 13"),
    (dict(cu=[0, 5, 4, 13]), ValueError, "`cu_seqlens` must be non-decreasing"),
    (dict(cu=[0.0, 13.0]), TypeError, "`cu_seqlens` must be a 1-D integer tensor"),
    (dict(cu=[0, 13], mask=[1] * 13), ValueError, "`cu_seqlens`.*`attention_mask`, not both"),
    (dict(B=2, mask=[0] + [2] * 12), ValueError, "`attention_mask` must hold only 0"),
    (dict(B=2, mask=[1] * 12), ValueError, "`attention_mask` must be a 0/1 padding mask"),
])
def test_bad_padding_arguments_name_the_argument(kwargs, error, match):
    """Offsets past the end, not from 0 or decreasing, and B > 1 with offsets over every row gave
    wrong outputs without an error; a mask of 0/2 attended like 0/1."""
    layer = make(4)
    B, extra = padding_call(kwargs)
    with pytest.raises(error, match=match):
        layer(x_(B=B), **extra)


def test_a_cache_of_other_sequences_is_named():
    layer = make(4).eval()
    with torch.no_grad():
        cache = layer(x_(), past_key_values=Cache(), use_cache=True)[2]
        with pytest.raises(ValueError, match="the cached attention state has 2 sequences, this call has 1"):
            layer(x_(B=1, T=1), past_key_values=cache, use_cache=True)


def test_persistent_memory_prepends_and_strips():
    pm = PersistentMemory(3, D)
    x = x_()
    y = pm.prepend(x)
    assert y.shape == (2, 16, D) and torch.equal(y[:, :3], pm.tokens.expand(2, -1, -1))
    assert torch.equal(pm.strip(y), x)
    assert pm.prefix().shape == (1, 3, D)
    with pytest.raises(ValueError, match="`num_tokens`"):
        PersistentMemory(0, D)
    for bad in (float("nan"), float("inf"), -0.02, 0.0):
        with pytest.raises(ValueError, match="`init_std`"):
            PersistentMemory(3, D, init_std=bad)
    with pytest.raises(ValueError, match="`x`"):
        pm.prepend(torch.randn(2, 4, D + 1))


def test_memory_gate_normalises_both_branches():
    gate = MemoryGate(D)
    a, m = x_(), x_(seed=2)
    out = gate(a, m)
    expected = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.sigmoid(
        m * torch.rsqrt(m.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert_close("gate", out, expected, 1e-6)
    assert_close("scale-free in a", gate(10 * a, m), out, 1e-5)
    with pytest.raises(ValueError, match="`activation`"):
        MemoryGate(D, activation="relu")
    with pytest.raises(ValueError, match="`norm_eps`"):
        MemoryGate(D, norm_eps=-1.0)
    with pytest.raises(ValueError, match="one shape"):
        gate(a, m[:, :3])


def test_attention_backend_is_checked():
    with pytest.raises(ValueError, match="attn_backend"):
        SlidingWindowAttention(32, 4, window_size=4, attn_backend="flash3")


@pytest.mark.skipif(not torch.cuda.is_available() or flash_attn_varlen_func is None,
                    reason="flash-attn's sliding-window path needs CUDA and flash-attn installed")
@pytest.mark.parametrize("packed", [False, True])
def test_flash_attention_path_equals_sdpa(packed):
    torch.manual_seed(0)
    layer = SlidingWindowAttention(256, 4, window_size=37, num_kv_heads=2).cuda().bfloat16()
    x = torch.randn(1 if packed else 2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kwargs = dict(cu_seqlens=torch.tensor([0, 100, 101, 300], device="cuda")) if packed else {}
    outputs, grads = [], []
    for backend in ("auto", "torch"):
        layer.attn_backend = backend
        o = layer(x, **kwargs)[0]
        (g,) = torch.autograd.grad(o.float().square().sum(), x)
        outputs.append(o.float())
        grads.append(g.float())
    assert relative_error(outputs[0], outputs[1]) < 2e-2
    assert relative_error(grads[0], grads[1]) < 5e-2
