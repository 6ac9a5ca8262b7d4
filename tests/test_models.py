"""Titans models (SPEC §3): causality, cached decoding, packing and padding, save/load, gradient
checkpointing, torch.compile, training, generation, config checks, the MAC pieces and fla mixers."""

import pytest
import torch
import torch.nn as nn
from fla.layers.utils import get_layer_cache, update_layer_cache
from fla.models.utils import Cache
from model_helpers import (MEMORIES, VARIANTS, cache_of, causality_violations, decode_logits, logits, tiny_config,
                           tiny_model, token_ids)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from titans_layers.models import (MACMixer, MACState, TitansCache, TitansConfig, TitansForCausalLM, TitansModel,
                                  cache_slots, variant_block_types)
from titans_layers.modules import NeuralMemory
from titans_layers.testing import assert_close

ALL = [(v, m) for v in VARIANTS for m in MEMORIES]
CUDA = torch.cuda.is_available()
# MAC's two retrieval modes: the segment's own queries (the default) or 3 learned queries per block
RETRIEVAL = {"per_token": {}, "learned": dict(num_retrieval_queries=3)}
# the learned mode where it matters: MAC with either memory, and the MAC + MAL preset
LEARNED = [("mac", "linear", "learned"), ("mac", "mlp", "learned"), ("mac_mal", "linear", "learned")]


# ---- causality --------------------------------------------------------------------------------

@pytest.mark.parametrize("j", [3, 10])  # mid-segment; a segment start (segment_size 5)
@pytest.mark.parametrize("variant, memory, retrieval", [(v, m, "per_token") for v, m in ALL] + LEARNED)
def test_changing_token_j_moves_no_earlier_logit(variant, memory, retrieval, j):
    before, after = causality_violations(tiny_model(variant, memory, **RETRIEVAL[retrieval]), token_ids(), j)
    assert before <= 1e-6, f"a logit before position {j} moved by {before:.2e}"
    assert after > 1e-4, f"no logit at or after position {j} moved (max change {after:.2e})"


def test_causality_of_a_hybrid_stack_with_plain_attention():
    model = tiny_model(block_types=["swa", "mac", "lmm"], num_hidden_layers=3)
    before, after = causality_violations(model, token_ids(), 7)
    assert before <= 1e-6 and after > 1e-4


def test_causality_check_catches_a_mac_that_shows_every_retrieved_token(monkeypatch):
    """If every retrieved token of a segment were visible to all its positions, token j's
    retrieval would reach earlier positions of its segment: the check must see it."""
    original = MACMixer._prefix

    def leaky(self, retrieved, first=None):
        prefix, positions = original(self, retrieved, first)
        return prefix, torch.full_like(positions, -1)

    monkeypatch.setattr(MACMixer, "_prefix", leaky)
    before, _ = causality_violations(tiny_model("mac"), token_ids(), 7)
    assert before > 1e-4


# ---- cached decoding ---------------------------------------------------------------------------

DECODE_CASES = [(v, m, "per_token", 7) for v, m in ALL] + [("mac", m, "per_token", p) for m in MEMORIES
                                                            for p in (1, 5, 10)]
DECODE_CASES += [(v, m, r, p) for v, m, r in LEARNED for p in (1, 5, 7, 10)]


@pytest.mark.parametrize("variant, memory, retrieval, prefill", DECODE_CASES)
def test_prefill_then_token_by_token_decoding_equals_full_forward(variant, memory, retrieval, prefill):
    """Prefill on a segment boundary (5), mid-segment and mid-chunk (7: phase 2, chunk offset 3),
    or a single token, then one token per call through fla's Cache."""
    model = tiny_model(variant, memory, **RETRIEVAL[retrieval])
    ids = token_ids()
    decoded, cache = decode_logits(model, ids, prefill)
    assert_close("decoded logits", decoded, logits(model, ids), 1e-5)
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_call_without_use_cache_leaves_the_cache_untouched(variant):
    """Scoring a continuation with ``use_cache=False`` reads the cache and writes nothing: decoding
    after it equals decoding from a cache that never saw that call (prefill 7: mid-segment and
    mid-chunk)."""
    model = tiny_model(variant)
    ids = token_ids(T=12)
    with torch.no_grad():
        ref_cache = cache_of(model(ids[:, :7], use_cache=True))
        ref = model(ids[:, 7:9], past_key_values=ref_cache, use_cache=True).logits
        cache = cache_of(model(ids[:, :7], use_cache=True))
        scored = model(ids[:, 7:10], past_key_values=cache, use_cache=False).logits
        assert cache.get_seq_length() == 7
        got = model(ids[:, 7:9], past_key_values=cache, use_cache=True).logits
    assert_close("scored continuation", scored, logits(model, ids[:, :10])[:, 7:], 1e-5)
    assert_close("decoded after the scoring call", got, ref, 1e-6)


class CacheWriter(nn.Module):
    """Stands in for fla's mixers (which need CUDA): reads its cached count and writes count + 1
    whenever it is given a cache, as fla's layers do whatever ``use_cache`` says."""

    layer_idx = 0

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        last = get_layer_cache(self, past_key_values)
        self.read = 0 if last is None else int(last["recurrent_state"])
        update_layer_cache(self, past_key_values, recurrent_state=torch.tensor(self.read + 1),
                           offset=hidden_states.shape[1])
        return hidden_states, None, past_key_values


def test_fla_mixers_read_but_do_not_write_the_cache_without_use_cache():
    block = tiny_model(block_types=["gated_deltanet", "lmm"]).model.layers[0]
    block.mixer = CacheWriter()
    x, cache = torch.randn(2, 3, 32), Cache()
    block(x, past_key_values=cache, use_cache=True)
    block(x, past_key_values=cache, use_cache=False)
    assert block.mixer.read == 1, "the call without use_cache reads the cached state"
    assert int(cache[0]["recurrent_state"]) == 1 and cache.get_seq_length() == 3


@pytest.mark.parametrize("variant, retrieval", [(v, "per_token") for v in ["mac", "mag", "mal", "lmm"]]
                         + [("mac", "learned")])
def test_left_padded_batch_equals_rows_alone_full_and_decoded(variant, retrieval):
    """Rows of different lengths sit at different places in their MAC segments while decoding;
    the last row has no token at all in the prefill."""
    model = tiny_model(variant, **RETRIEVAL[retrieval])
    ids = token_ids(B=3, T=14)
    starts = [0, 3, 10]
    mask = torch.ones_like(ids)
    for b, s in enumerate(starts):
        ids[b, :s], mask[b, :s] = 0, 0
    full = logits(model, ids, attention_mask=mask)
    decoded, _ = decode_logits(model, ids, 9, attention_mask=mask)
    for b, s in enumerate(starts):
        alone = logits(model, ids[b:b + 1, s:])
        assert_close(f"row {b}, full forward", full[b:b + 1, s:], alone, 1e-5)
        assert_close(f"row {b}, decoded", decoded[b:b + 1, s:], alone, 1e-5)


def test_cache_holds_every_sublayer_and_the_mac_state():
    model = tiny_model("mac_mal")
    assert [layer.mixer.layer_idx for layer in model.model.layers[::2]] == [0]
    with torch.no_grad():
        cache = cache_of(model(token_ids(T=7), use_cache=True))
    assert len(cache) == 5 and all(cache[i]["recurrent_state"] is not None for i in range(5))
    state = cache[0]["recurrent_state"]
    assert isinstance(state, MACState)
    assert state.phase.tolist() == [2, 2] and state.retrieved.shape == (2, 5, 32)
    assert cache[1]["conv_state"] is not None and state.conv_state.shape == (2, 3, 32)


def test_mac_state_with_learned_queries_holds_the_r_retrieved_tokens_only():
    model = tiny_model("mac", **RETRIEVAL["learned"])
    with torch.no_grad():
        cache = cache_of(model(token_ids(T=7), use_cache=True))
    state = cache[0]["recurrent_state"]
    assert isinstance(state, MACState) and state.phase.tolist() == [2, 2]
    assert state.retrieved.shape == (2, 3, 32)
    assert state.start_weights is None and state.conv_state is None


# ---- packing, padding ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant, memory, retrieval", [(v, "linear", "per_token") for v in VARIANTS]
                         + [("mac", "mlp", "per_token"), ("mal", "mlp", "per_token")] + LEARNED)
def test_packed_sequences_equal_separate_runs(variant, memory, retrieval):
    model = tiny_model(variant, memory, **RETRIEVAL[retrieval])
    ids = token_ids(B=1, T=20)
    cu = torch.tensor([0, 3, 3, 12, 20])
    packed = logits(model, ids, cu_seqlens=cu)
    for bos, eos in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if eos > bos:
            assert_close(f"sequence [{bos}, {eos})", packed[:, bos:eos], logits(model, ids[:, bos:eos]), 1e-5)


@pytest.mark.parametrize("retrieval", list(RETRIEVAL))
@pytest.mark.parametrize("memory", MEMORIES)
def test_mac_general_path_equals_whole_sequence_path(memory, retrieval):
    """The packed, cache-driven MAC path (taken here through an all-ones mask) and the plain
    per-segment loop compute the same thing."""
    mixer = tiny_model("mac", memory, **RETRIEVAL[retrieval]).model.layers[0].mixer
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole, _, _ = mixer(x)
        general, _, _ = mixer(x, attention_mask=torch.ones(2, 17, dtype=torch.long))
    assert_close("general path", general, whole, 1e-5)


@pytest.mark.parametrize("variant, memory", [("mac", "linear"), ("mal", "linear"), ("mal", "mlp")])
def test_triton_memory_backend_gives_the_pytorch_logits(variant, memory):
    """The Triton memory ops (natively on CUDA, interpreted on CPU) in a whole model: full forward,
    left padding, and decoding (the fused recurrent kernel) against the PyTorch path."""
    device = "cuda" if CUDA else "cpu"
    ref = tiny_model(variant, memory, chunk_size=16, memory_backend="torch").to(device)
    tri = tiny_model(variant, memory, chunk_size=16, memory_backend="triton").to(device)
    ids = token_ids(T=21).to(device)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    tol = 2e-3 if CUDA else 1e-5
    full = logits(ref, ids, attention_mask=mask)
    assert_close("full forward", logits(tri, ids, attention_mask=mask), full, tol)
    decoded, _ = decode_logits(tri, ids, 7, attention_mask=mask)
    assert_close("decoded, row 0", decoded[:1], full[:1], tol)
    assert_close("decoded, row 1", decoded[1:, 4:], full[1:, 4:], tol)


# ---- the memory's read-only retrieval (used by MAC) --------------------------------------------

@pytest.mark.parametrize("memory", MEMORIES)
def test_memory_retrieve_reads_like_the_forward(memory):
    torch.manual_seed(0)
    layer = NeuralMemory(32, 2, memory=memory, chunk_size=4, layer_idx=0).eval()
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        o, _, cache = layer(x, past_key_values=Cache(), use_cache=True)
        q, _ = layer.query(x)
        # the forward reads o_t = f(q_t; W_t) after token t's write: the final state holds W_6
        got = layer.retrieve(q[:, -1:], x[:, -1:], layer.memory_weights(cache[0]["recurrent_state"]))
        assert_close("read at the final state", got, o[:, -1:], 1e-5)
        # the query convolution continues across calls
        q1, conv = layer.query(x[:, :4], output_conv_state=True)
        q2, _ = layer.query(x[:, 4:], conv_state=conv)
        assert_close("continued queries", torch.cat([q1, q2], 1), q, 1e-6)
    with pytest.raises(ValueError, match="`q`"):
        layer.retrieve(q[..., :8], x, layer.memory_weights())


def test_memory_query_tokens_is_the_query_path_without_the_convolution():
    torch.manual_seed(0)
    layer = NeuralMemory(32, 2, use_short_conv=False)
    tokens = torch.randn(5, 32)
    with torch.no_grad():
        got = layer.query_tokens(tokens)  # [5, H, K]
        assert_close("token queries", got, layer.query(tokens[None])[0][0], 1e-6)
    assert got.shape == (5, 2, 16)
    with pytest.raises(ValueError, match="`tokens`"):
        layer.query_tokens(tokens[:, :8])


# ---- MAC's learned retrieval queries ------------------------------------------------------------

def _mac_prefixes(mixer, x, **kwargs):
    """Run a MAC mixer on ``x`` without gradients: its output and, per attention call (one per
    segment on the whole-sequence path), the ``(prefix_states, prefix_positions)`` it attended over."""
    calls = []

    def record(module, args, kw):
        calls.append((kw["prefix_states"].clone(), kw["prefix_positions"].clone()))

    handle = mixer.attention.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            out = mixer(x, **kwargs)[0]
    finally:
        handle.remove()
    return out, calls


@pytest.mark.parametrize("memory", MEMORIES)
def test_learned_queries_retrieve_r_tokens_that_depend_only_on_earlier_segments(memory):
    """Each segment attends over N_p + R prefix tokens, all visible; changing a token inside
    segment 1 leaves the retrieved tokens of segments 0 and 1 alone and moves those of segment 2
    (its write reached the memory). Per-token retrieval, by contrast, moves segment 1's own
    retrieved tokens from that position on."""
    P, R, S = 2, 3, 5
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    y[:, 7] += 1.0  # in-segment position 2 of segment 1
    mixer = tiny_model("mac", memory, **RETRIEVAL["learned"]).model.layers[0].mixer
    _, px = _mac_prefixes(mixer, x)
    _, py = _mac_prefixes(mixer, y)
    assert len(px) == 4
    for prefix, positions in px:
        assert prefix.shape == (2, P + R, 32) and bool((positions == -1).all())
    for seg in (0, 1):
        assert_close(f"retrieved tokens of segment {seg}", py[seg][0][:, P:], px[seg][0][:, P:], 1e-6)
    assert (py[2][0][:, P:] - px[2][0][:, P:]).abs().max() > 1e-4, "the write did not reach segment 2's retrieval"

    per_token = tiny_model("mac", memory).model.layers[0].mixer
    _, qx = _mac_prefixes(per_token, x)
    _, qy = _mac_prefixes(per_token, y)
    assert qx[1][0].shape == (2, P + S, 32)
    change = (qy[1][0] - qx[1][0]).abs().amax(dim=(0, 2))  # [P + S]
    assert change[:P + 2].max() <= 1e-6 and change[P + 2] > 1e-4


@pytest.mark.parametrize("memory", MEMORIES)
def test_every_position_of_a_segment_sees_all_learned_retrieved_tokens(memory):
    """Moving the last learned query moves the output at the first position of every segment
    (position 0 sees retrieved token R - 1; under the per-token rule it would not, and nothing
    else carries the change to position 0)."""
    mixer = tiny_model("mac", memory, **RETRIEVAL["learned"]).model.layers[0].mixer
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        if memory == "linear":  # the initial memory M = 0 reads 0 whatever the query: make it a trained-like one
            mixer.memory.init_M.normal_(std=0.3, generator=torch.Generator().manual_seed(6))
        before = mixer(x)[0]
        mixer.retrieval_queries[-1] += 1.0
        after = mixer(x)[0]
    change = (after - before).abs().amax(dim=(0, 2))  # [T]
    assert bool((change[::5] > 1e-4).all()), f"segment starts moved by {change[::5].tolist()}"


def test_decoding_reads_the_learned_queries_once_per_segment_start(monkeypatch):
    """The R retrieved tokens are read when a sequence begins a segment, kept in ``MACState``
    and not read again by the segment's later tokens; they equal the whole-sequence path's."""
    P = 2
    mixer = tiny_model("mac", **RETRIEVAL["learned"]).model.layers[0].mixer
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(5))
    full, calls = _mac_prefixes(mixer, x)
    reads = []
    original = MACMixer._learned_retrieval

    def counted(self, weights):
        reads.append(weights[0].shape[0])
        return original(self, weights)

    monkeypatch.setattr(MACMixer, "_learned_retrieval", counted)
    with torch.no_grad():
        out, _, cache = mixer(x[:, :7], past_key_values=Cache(), use_cache=True)
        assert reads == [2, 2], "the prefill should read at the starts of segments 0 and 1"
        state = cache[mixer.layer_idx]["recurrent_state"]
        assert state.retrieved.shape == (2, 3, 32)
        assert_close("cached retrieved tokens, segment 1", state.retrieved, calls[1][0][:, P:], 1e-6)
        outs = [out]
        for t in range(7, 12):
            outs.append(mixer(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0])
        assert reads == [2, 2, 2], "only token 10 (a segment start) should read the memory"
        state = cache[mixer.layer_idx]["recurrent_state"]
        assert_close("cached retrieved tokens, segment 2", state.retrieved, calls[2][0][:, P:], 1e-6)
    assert_close("decoded mixer output", torch.cat(outs, 1), full, 1e-5)


# ---- save / load, registration ------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(variant="mac_mal", memory="mlp"),
                                       dict(block_types=["swa", "mag"]),
                                       dict(variant="lmm", tie_word_embeddings=True),
                                       dict(variant="mac", memory="mlp", **RETRIEVAL["learned"])])
def test_save_pretrained_from_pretrained_round_trip_is_exact(tmp_path, overrides):
    model = tiny_model(**overrides)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is TitansForCausalLM
    config, expected = loaded.config.to_dict(), model.config.to_dict()
    config.pop("_name_or_path"), expected.pop("_name_or_path")
    assert config == expected
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embeddings.weight
    # the loaded tensors live in the checkpoint's memory map, at offsets that SIMD kernels may round
    # differently (last-bit changes); in fresh storage the loaded model computes bit for bit the same
    for param in loaded.parameters():
        param.data = param.data.clone()
    ids = token_ids()
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embeddings.weight


def test_auto_classes_know_titans():
    args = {k: v for k, v in tiny_config().to_dict().items() if k not in ("model_type", "transformers_version")}
    config = AutoConfig.for_model("titans", **args)
    assert type(config) is TitansConfig
    assert type(AutoModel.from_config(config)) is TitansModel
    assert type(AutoModelForCausalLM.from_config(config)) is TitansForCausalLM


# ---- training: gradient checkpointing, compile, loss --------------------------------------------

def _gradients(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant, memory", [("mac_mal", "linear"), ("mag", "mlp")])
def test_gradient_checkpointing_gives_the_same_gradients(variant, memory):
    model = tiny_model(variant, memory).train()
    ids = token_ids(T=13)
    calls = []
    model.model.layers[0].mixer.register_forward_pre_hook(lambda *_: calls.append(1))
    plain = _gradients(model, ids)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    n_before = len(calls)
    checkpointed = _gradients(model, ids)
    assert len(calls) - n_before == 2, "the checkpointed block was not recomputed in the backward pass"
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert_close(f"grad of {name}", checkpointed[name], plain[name], 1e-6)


@pytest.mark.parametrize("variant, retrieval", [(v, "per_token") for v in VARIANTS] + [("mac", "learned")])
def test_every_parameter_gets_a_gradient(variant, retrieval):
    model = tiny_model(variant, **RETRIEVAL[retrieval]).train()
    if retrieval == "learned":
        assert any(n.endswith("mixer.retrieval_queries") for n, _ in model.named_parameters())
    _gradients(model, token_ids())
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("variant, memory", [(v, "linear") for v in VARIANTS] + [("mac", "mlp")])
def test_a_few_training_steps_drive_the_loss_down(variant, memory):
    model = tiny_model(variant, memory, segment_size=8, window_size=8).train()
    ids = token_ids(T=24)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_loss_is_next_token_cross_entropy_and_logits_to_keep():
    model = tiny_model("mag")
    ids = token_ids()
    labels = ids.clone()
    labels[:, 5] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        last = model(ids, logits_to_keep=1).logits
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100)
    assert_close("loss", out.loss, expected, 1e-6)
    assert last.shape == (2, 1, 100)
    assert_close("last logits", last, out.logits[:, -1:], 1e-6)


COMPILE_BACKEND = "inductor" if CUDA else "aot_eager"  # inductor's CPU codegen takes minutes here


@pytest.mark.parametrize("variant, retrieval", [(v, "per_token") for v in ["mac", "mag", "mal", "lmm", "mac_mal"]]
                         + [("mac", "learned")])
def test_torch_compile_fullgraph_of_a_whole_model(variant, retrieval):
    """No graph breaks: the memory update runs as a custom op (titans_layers.ops.library)."""
    model = tiny_model(variant, **RETRIEVAL[retrieval])
    ids = token_ids(T=10)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=COMPILE_BACKEND, fullgraph=True)
    with torch.no_grad():
        got = compiled(ids, use_cache=False).logits
    assert_close("compiled logits", got, logits(model, ids), 1e-5)


# ---- reordered cache rows (generation itself: test_generation.py) ------------------------------

@pytest.mark.parametrize("variant, retrieval", [("mac", "per_token"), ("mal", "per_token"), ("mac", "learned")])
def test_reordered_cache_decodes_the_reordered_rows(variant, retrieval):
    """Beam search reorders the cache's rows: every layer's state must keep its type and rows."""
    model = tiny_model(variant, "mlp", **RETRIEVAL[retrieval])
    ids = token_ids(B=3, T=9)
    with torch.no_grad():
        cache = cache_of(model(ids[:, :7], use_cache=True))
        assert isinstance(cache, TitansCache)
        ref = model(ids[:, 7:8], past_key_values=cache, use_cache=True).logits
        cache = cache_of(model(ids[:, :7], use_cache=True))
        order = torch.tensor([2, 0, 1])
        cache.reorder_cache(order)
        got = model(ids[order, 7:8], past_key_values=cache, use_cache=True).logits
    assert_close("decoded after reordering", got, ref[order], 1e-6)


# ---- config and input checks --------------------------------------------------------------------

def test_variant_presets():
    assert variant_block_types("mac_mal", 5) == ["mac", "mal", "mac", "mal", "mac"]
    assert tiny_config("mal").block_types == ["mal", "mal"]
    assert tiny_config("mal", block_types=["swa", "gated_deltanet"]).block_types == ["swa", "gated_deltanet"]
    assert cache_slots(["mac", "mal", "swa", "mamba2"]) == [[0, 1, 2], [3, 4], [5], [6]]


@pytest.mark.parametrize("overrides, match", [
    (dict(variant="mat"), "`variant`"),
    (dict(block_types=["mac"]), "`block_types`"),
    (dict(block_types=["mac", "attention"]), r"`block_types\[1\]`"),
    (dict(memory="conv"), "`memory`"),
    (dict(vocab_size=0), "`vocab_size`"),
    (dict(hidden_size=-32), "`hidden_size`"),
    (dict(num_heads=3), "divisible by `num_heads`"),
    (dict(num_kv_heads=3), "multiple of `num_kv_heads`"),
    (dict(head_dim=0), "`head_dim`"),
    (dict(segment_size=0), "`segment_size`"),
    (dict(window_size=1.5), "`window_size`"),
    (dict(chunk_size=0), "`chunk_size`"),
    (dict(num_persistent_tokens=-1), "`num_persistent_tokens`"),
    (dict(num_retrieval_queries=-1), "`num_retrieval_queries`"),
    (dict(num_retrieval_queries=2.0), "`num_retrieval_queries`"),
    (dict(num_retrieval_queries=True), "`num_retrieval_queries`"),
    (dict(num_retrieval_queries="4"), "`num_retrieval_queries`"),
    (dict(memory_activation="relu"), "`memory_activation`"),
    (dict(gate_activation="tanh"), "`gate_activation`"),
    (dict(max_step_size=0), "`max_step_size`"),
    (dict(max_step_size=float("inf")), "`max_step_size`"),
    (dict(rope_base=0.0), "`rope_base`"),
    (dict(rope_base=float("inf")), "`rope_base`"),
    (dict(initializer_range=float("inf")), "`initializer_range`"),
    (dict(mlp_residual="yes"), "`mlp_residual`"),
    (dict(memory_backend="cuda"), "`memory_backend`"),
    (dict(memory="mlp", memory_backend="triton", chunk_size=8), "`memory_backend='triton'` needs `chunk_size`"),
    (dict(memory_backend="triton", chunk_size=16, head_dim=256), "`head_dim` <= 128"),
    (dict(fla_mixer_kwargs={"mamba": {}}), "`fla_mixer_kwargs`"),
    (dict(norm_eps=0.0), "`norm_eps`"),
    (dict(norm_eps=float("nan")), "`norm_eps`"),
    (dict(intermediate_size=0), "`intermediate_size`"),
])
def test_bad_config_fields_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


@pytest.mark.parametrize("field, value", [("max_step_size", float("inf")), ("norm_eps", float("nan")),
                                          ("mlp_residual", "no"), ("rope_base", 0.0)])
def test_bad_values_set_on_a_config_are_named_when_the_model_is_built(field, value):
    """The layers check what the config passes them, so a field changed after the config's own
    checks still fails at construction, not as non-finite outputs or in the forward."""
    config = tiny_config("mag", "mlp")
    setattr(config, field, value)
    with pytest.raises(ValueError, match=f"`{field}`"):
        TitansForCausalLM(config)


def test_mac_mixer_checks_its_padding_arguments():
    mixer = tiny_model("mac").model.layers[0].mixer
    x = torch.randn(1, 10, 32)
    with pytest.raises(ValueError, match="`cu_seqlens` must end at T = 10"):
        mixer(x, cu_seqlens=torch.tensor([0, 4, 12]))
    with pytest.raises(ValueError, match="`cu_seqlens` must be non-decreasing"):
        mixer(x, cu_seqlens=torch.tensor([0, 6, 4, 10]))
    with pytest.raises(ValueError, match="not both"):
        mixer(x, attention_mask=torch.ones(1, 10), cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="`attention_mask` must hold only 0"):
        mixer(x, attention_mask=torch.full((1, 10), 2))


def test_bad_inputs_are_named():
    model = tiny_model("mac")
    ids = token_ids()
    with pytest.raises(ValueError, match="exactly one of `input_ids`"):
        model(ids, inputs_embeds=torch.randn(2, 17, 32))
    with pytest.raises(TypeError, match="`inputs_embeds` is torch.bfloat16 but the weights are torch.float32"):
        model(inputs_embeds=torch.randn(2, 17, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"`inputs_embeds` must have shape \[B, T, 32\]"):
        model(inputs_embeds=torch.randn(2, 17, 31))
    with pytest.raises(ValueError, match="`attention_mask`"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="`cu_seqlens`.*batch size"):
        model(ids, cu_seqlens=torch.tensor([0, 17]))
    with pytest.raises(ValueError, match="`cu_seqlens` must start at 0"):
        model(ids[:1], cu_seqlens=torch.tensor([1, 5, 17]))
    with pytest.raises(ValueError, match="`cu_seqlens` must end at T = 17"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 5, 16]))
    with pytest.raises(ValueError, match="`attention_mask` must hold only 0"):
        model(ids, attention_mask=2 * torch.ones_like(ids))
    mask = torch.ones(1, 17, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="not both"):
        model(ids[:1], attention_mask=mask, cu_seqlens=torch.tensor([0, 17]))
    with pytest.raises(ValueError, match="`labels`"):
        model(ids, labels=ids[:, :5])
    cache = cache_of(model(ids, use_cache=True))
    with pytest.raises(ValueError, match="cached MAC state has 2 sequences"):
        model(ids[:1, :1], past_key_values=cache, use_cache=True)


# ---- fla mixers in a hybrid stack ---------------------------------------------------------------

FLA_STACK = dict(block_types=["gated_deltanet", "mac", "deltanet", "mamba2"], num_hidden_layers=4,
                 fla_mixer_kwargs={"mamba2": {"state_size": 16}})


def test_fla_mixers_build_in_a_hybrid_stack():
    from fla.layers import DeltaNet, GatedDeltaNet, Mamba2
    model = tiny_model(**FLA_STACK)
    mixers = [layer.mixer for layer in model.model.layers]
    assert [type(m) for m in mixers] == [GatedDeltaNet, MACMixer, DeltaNet, Mamba2]
    assert [m.layer_idx for m in mixers] == [0, 1, 4, 5]
    assert mixers[3].ssm_state_size == 16


@pytest.mark.skipif(not CUDA, reason="fla's GatedDeltaNet / DeltaNet / Mamba2 run autotuned Triton kernels, and "
                                     "Triton's CPU interpreter has no driver to autotune with")
def test_fla_mixers_run_causally_and_decode_in_a_hybrid_stack():
    model = tiny_model(**FLA_STACK).cuda()
    ids = token_ids().cuda()
    full = logits(model, ids)
    assert torch.isfinite(full).all()
    before, after = causality_violations(model, ids, 7)
    assert before <= 1e-4 and after > 1e-3
    decoded, _ = decode_logits(model, ids, 7)
    assert_close("decoded logits", decoded, full, 5e-3)
