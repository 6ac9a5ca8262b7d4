"""NeuralMemory: fla's layer interface, padding, packing, cached decoding, dispatch, gradients, errors."""

import pytest
import torch
from fla.models.utils import Cache
from layer_helpers import decode_token_by_token, padding_call

from titans_layers.modules import NeuralMemory, ShortConvolution
from titans_layers.testing import assert_close, relative_error

MEMORIES = ["linear", "mlp"]
D, H = 32, 2


def make_layer(memory, **kw):
    torch.manual_seed(0)
    args = dict(memory=memory, chunk_size=4, layer_idx=0)
    args.update(kw)
    return NeuralMemory(D, H, **args)


def inputs(B=2, T=13, seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("use_short_conv", [True, False])
@pytest.mark.parametrize("memory", MEMORIES)
def test_left_padding_equals_unpadded_sequences(memory, use_short_conv):
    layer = make_layer(memory, use_short_conv=use_short_conv)
    x = inputs(B=3)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :11] = 0
    o, attn, _ = layer(x, attention_mask=mask)
    assert attn is None
    for b, start in enumerate([0, 4, 11]):
        alone, _, _ = layer(x[b:b + 1, start:])
        assert_close(f"row {b}", o[b:b + 1, start:], alone, 1e-5)


@pytest.mark.parametrize("memory", MEMORIES)
def test_packed_sequences_equal_separate_runs(memory):
    layer = make_layer(memory)
    x = inputs(B=1, T=20)
    cu = torch.tensor([0, 3, 3, 12, 20])
    o, _, _ = layer(x, cu_seqlens=cu)
    for bos, eos in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if eos > bos:
            alone, _, _ = layer(x[:, bos:eos])
            assert_close(f"sequence [{bos}, {eos})", o[:, bos:eos], alone, 1e-5)


@pytest.mark.parametrize("prefill", [1, 6, 8])
@pytest.mark.parametrize("memory", MEMORIES)
def test_cached_decoding_equals_full_forward(memory, prefill):
    """Prefill (mid-chunk or on a boundary) then one token per call through fla's Cache."""
    layer = make_layer(memory).eval()
    x = inputs()
    with torch.no_grad():
        full, _, _ = layer(x)
    decoded, cache = decode_token_by_token(layer, x, prefill)
    assert_close("decoded", decoded, full, 1e-5)
    assert cache.get_seq_length(0) == x.shape[1]


@pytest.mark.parametrize("use_short_conv", [True, False])
@pytest.mark.parametrize("memory", MEMORIES)
def test_a_call_without_use_cache_reads_the_cache_and_leaves_it_untouched(memory, use_short_conv):
    """Scoring a continuation with ``use_cache=False`` continues from the cache and writes nothing:
    the next cached call sees the cache as the prefill left it."""
    layer = make_layer(memory, use_short_conv=use_short_conv).eval()
    x = inputs(T=10)
    with torch.no_grad():
        ref = layer(x[:, :6], past_key_values=Cache(), use_cache=True)[2]
        ref_next = layer(x[:, 6:7], past_key_values=ref, use_cache=True)[0]
        cache = layer(x[:, :6], past_key_values=Cache(), use_cache=True)[2]
        scored = layer(x[:, 6:9], past_key_values=cache, use_cache=False)[0]
        assert cache.get_seq_length(0) == 6
        assert_close("scored continuation", scored, layer(x)[0][:, 6:9], 1e-5)
        assert_close("next token", layer(x[:, 6:7], past_key_values=cache, use_cache=True)[0], ref_next, 1e-6)


def test_cached_decoding_with_left_padding():
    layer = make_layer("linear").eval()
    x = inputs(B=2, T=10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        full, _, _ = layer(x, attention_mask=mask)
    got, _ = decode_token_by_token(layer, x, 7, attention_mask=mask)
    assert_close("decoded, row 0", got[0, 3:], full[0, 3:], 1e-5)
    assert_close("decoded, row 1", got[1], full[1], 1e-5)


@pytest.mark.parametrize("max_update_norm", [None, 1e-3], ids=["free", "clipped"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_triton_dispatch_equals_pytorch_path(memory, max_update_norm):
    """The Triton ops (natively on CUDA, interpreted on CPU) give the PyTorch path's results, with
    update clipping too (a bound that clips most writes)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = make_layer(memory, chunk_size=16, backend="torch", max_update_norm=max_update_norm).to(device)
    tri = make_layer(memory, chunk_size=16, backend="triton", max_update_norm=max_update_norm).to(device)
    tri.load_state_dict(ref.state_dict())
    x = inputs(T=37).to(device)
    outs, grads = [], []
    for layer in (ref, tri):
        o, _, _ = layer(x)
        o.square().mean().backward()
        outs.append(o.detach())
        grads.append({n: p.grad for n, p in layer.named_parameters()})
    tol = 2e-3 if device == "cuda" else 1e-5
    assert_close("output", outs[1], outs[0], tol)
    for name in grads[0]:
        assert_close(f"grad of {name}", grads[1][name], grads[0][name], 10 * tol)
    if max_update_norm is not None:  # the bound bites: without it the output is far off
        free = make_layer(memory, chunk_size=16, backend="torch").to(device)
        with torch.no_grad():
            assert relative_error(free(x)[0], outs[0]) > 1e-2


@pytest.mark.parametrize("memory", MEMORIES)
def test_every_parameter_gets_a_gradient(memory):
    layer = make_layer(memory)
    o, _, _ = layer(inputs())
    o.square().mean().backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("kwargs, match", [
    (dict(memory="attention"), "`memory`"),
    (dict(num_heads=3), "divisible by `num_heads`"),
    (dict(num_heads=0), "`num_heads`"),
    (dict(chunk_size=0), "`chunk_size`"),
    (dict(activation="relu"), "`activation`"),
    (dict(max_step_size=0.0), "`max_step_size`"),
    (dict(max_step_size=float("inf")), "`max_step_size`"),
    (dict(max_step_size=True), "`max_step_size`"),
    (dict(norm_eps=0.0), "`norm_eps`"),
    (dict(norm_eps=float("nan")), "`norm_eps`"),
    (dict(memory="mlp", mlp_residual="no"), "`mlp_residual`"),
    (dict(use_short_conv=1), "`use_short_conv`"),
    (dict(backend="cuda"), "`backend`"),
    (dict(chunk_size=8, backend="triton"), "`backend='triton'`"),
    (dict(conv_size=0), "`conv_size`"),
    (dict(memory="mlp", mlp_expansion=0), "`mlp_expansion`"),
])
def test_bad_constructor_arguments_name_the_argument(kwargs, match):
    args = dict(hidden_size=D, num_heads=H)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        NeuralMemory(**args)


def test_bad_inputs_name_the_argument():
    layer = make_layer("linear")
    with pytest.raises(ValueError, match="`hidden_states`"):
        layer(torch.randn(2, 5, D + 1))
    with pytest.raises(ValueError, match="`attention_mask`"):
        layer(torch.randn(2, 5, D), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="`attention_mask`"):
        layer(torch.randn(2, 5, D), attention_mask=torch.ones(2, 5, 5))


@pytest.mark.parametrize("memory", MEMORIES)
def test_inputs_in_another_dtype_than_the_weights_are_named(memory):
    """A bf16 input to a float32 layer is named (torch's matmul error named neither); under
    autocast, which casts at each matmul, it runs."""
    layer = make_layer(memory)
    with pytest.raises(TypeError, match="`hidden_states` is torch.bfloat16 but the weights are torch.float32"):
        layer(inputs().bfloat16())
    with pytest.raises(TypeError, match="`hidden_states` must be a floating tensor"):
        layer(inputs().long())
    with pytest.raises(TypeError, match="`x` is torch.float16"):
        ShortConvolution(8, 3)(torch.randn(1, 6, 8, dtype=torch.float16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, _, _ = layer(inputs().bfloat16())
    assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(B=2, cu=[0, 3, 13]), ValueError, "`cu_seqlens`.*batch size 1"),
    (dict(cu=[1, 3, 13]), ValueError, "`cu_seqlens` must start at 0"),
    (dict(cu=[0, 3, 12]), ValueError, "`cu_seqlens` must end at T = 13"),
    (dict(cu=[0, 3, 15]), ValueError, "`cu_seqlens` must end at T = 13"),
    (dict(cu=[0, 5, 3, 13]), ValueError, "`cu_seqlens` must be non-decreasing"),
    (dict(cu=[0.0, 13.0]), TypeError, "`cu_seqlens` must be a 1-D integer tensor"),
    (dict(cu=[0, 13], mask=[1] * 13), ValueError, "`cu_seqlens`.*`attention_mask`, not both"),
    (dict(B=2, mask=[0, 0] + [2] * 11), ValueError, "`attention_mask` must hold only 0"),
    (dict(B=2, mask=[0.5] * 13), ValueError, "`attention_mask` must hold only 0"),
])
def test_bad_padding_arguments_name_the_argument(kwargs, error, match):
    """Checked before unpadding and the short convolution (which raised IndexErrors or read out of place)."""
    layer = make_layer("linear")
    B, extra = padding_call(kwargs)
    with pytest.raises(error, match=match):
        layer(inputs(B=B), **extra)


def test_valid_masks_of_every_dtype_are_accepted():
    layer = make_layer("linear")
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0
    o, _, _ = layer(inputs(), attention_mask=mask)
    for dtype in (torch.bool, torch.int32, torch.float32):
        assert_close(f"{dtype} mask", layer(inputs(), attention_mask=mask.to(dtype))[0], o, 1e-6)


@pytest.mark.parametrize("use_short_conv", [True, False])
def test_a_cache_of_other_sequences_is_named(use_short_conv):
    layer = make_layer("linear", use_short_conv=use_short_conv).eval()
    with torch.no_grad():
        cache = layer(inputs(), past_key_values=Cache(), use_cache=True)[2]
        with pytest.raises(ValueError, match="the cached memory state has 2 sequences, this call has 1"):
            layer(inputs(B=1, T=1), past_key_values=cache, use_cache=True)


def test_short_convolution_checks_its_inputs():
    conv = ShortConvolution(8, 3)
    with pytest.raises(ValueError, match="`cu_seqlens` must end at T = 6"):
        conv(torch.randn(1, 6, 8), cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match="`x` must have shape"):
        conv(torch.randn(6, 8))
    with pytest.raises(ValueError, match="`x` must have shape"):
        conv(torch.randn(1, 6, 5))
    with pytest.raises(ValueError, match="`kernel_size`"):
        ShortConvolution(8, True)
