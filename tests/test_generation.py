"""``generate()`` equals full forwards (SPEC §3) for every variant and memory, greedy, sampled and
beam search, with a left-padded batch; the cache under either keyword Transformers uses
(``past_key_values`` up to 5.23, ``cache`` from 5.24 on). The version-matrix step of CI runs this
file again under the oldest and the newest supported Transformers."""

import pytest
import torch
from fla.models.utils import Cache
from model_helpers import MEMORIES, VARIANTS, cache_of, logits, tiny_model, token_ids

from titans_layers.models import TitansCache
from titans_layers.models.generation import LM_CACHE_FIELD, MODEL_CACHE_FIELD
from titans_layers.modules import NeuralMemory
from titans_layers.testing import assert_close

ALL = [(v, m) for v in VARIANTS for m in MEMORIES]
NEW = 6  # new tokens: past the window (6) and a MAC segment (5) of the tiny models


def left_padded(B=2, T=9) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids ``[B, T]`` and their padding mask; row 1 has 3 padding tokens on the left."""
    ids = token_ids(B=B, T=T)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def full_logits(model, sequences, mask, prompt_len: int) -> torch.Tensor:
    """The logits a full forward gives at the positions that chose the new tokens ``[B, NEW, V]``."""
    mask = torch.cat([mask, torch.ones_like(sequences[:, prompt_len:])], dim=1)
    return logits(model, sequences, attention_mask=mask)[:, prompt_len - 1:-1]


@pytest.mark.parametrize("variant, memory", ALL)
def test_greedy_generate_equals_full_forwards(variant, memory):
    """Every step's logits equal a full forward over the tokens so far, and each chosen token is
    their argmax."""
    model = tiny_model(variant, memory)
    ids, mask = left_padded()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    cached = torch.stack(out.logits, dim=1)  # [B, NEW, V]
    reference = full_logits(model, out.sequences, mask, ids.shape[1])
    assert_close("greedy logits", cached, reference, 1e-5)
    assert torch.equal(out.sequences[:, ids.shape[1]:], reference.argmax(-1))


@pytest.mark.parametrize("variant, memory", ALL)
def test_sampled_generate_equals_full_forwards(variant, memory):
    """Sampling: the logits each sampled token was drawn from equal a full forward over the sampled
    sequence, and a seed reproduces the sample."""
    model = tiny_model(variant, memory)
    ids, mask = left_padded()
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, top_k=0,
                                   output_logits=True, return_dict_in_generate=True))
    out = runs[0]
    assert torch.equal(out.sequences, runs[1].sequences)
    assert torch.equal(out.sequences[:, :ids.shape[1]], ids)
    assert_close("sampled logits", torch.stack(out.logits, dim=1),
                 full_logits(model, out.sequences, mask, ids.shape[1]), 1e-5)


@pytest.mark.parametrize("variant, memory", ALL)
def test_beam_search_scores_equal_full_forwards(variant, memory):
    """Beam search reorders the cache's rows at every step: each returned beam's score (the sum of
    its tokens' log-probabilities, ``length_penalty=0``) equals the one a full forward over that
    beam gives, so every row decoded from its own history."""
    model = tiny_model(variant, memory)
    ids, mask = left_padded()
    beams = 3
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=beams,
                         num_return_sequences=beams, length_penalty=0.0, output_scores=True,
                         return_dict_in_generate=True)
    seqs = out.sequences  # [B * beams, T + NEW]
    assert seqs.shape == (2 * beams, ids.shape[1] + NEW)
    rows_mask = mask.repeat_interleave(beams, dim=0)
    assert torch.equal(seqs[:, :ids.shape[1]], ids.repeat_interleave(beams, dim=0))
    logp = full_logits(model, seqs, rows_mask, ids.shape[1]).double().log_softmax(-1)  # [B * beams, NEW, V]
    score = logp.gather(-1, seqs[:, ids.shape[1]:, None]).sum((1, 2))  # [B * beams]
    assert_close("beam scores", out.sequences_scores.double(), score, 1e-5)
    assert len(set(map(tuple, seqs[:beams].tolist()))) == beams, "the beams of a row differ"


# ---- the cache keyword -------------------------------------------------------------------------

def test_cache_keyword_and_past_key_values_give_the_same_decoding():
    model = tiny_model("mac_mal", "mlp")
    ids = token_ids(T=9)
    results = []
    for name in ("past_key_values", "cache"):
        with torch.no_grad():
            out = model(ids[:, :7], use_cache=True, **{name: TitansCache()})
            step = model(ids[:, 7:9], use_cache=True, **{name: cache_of(out)})
        results.append(step.logits)
    assert_close("logits decoded from `cache`", results[1], results[0], 0.0)
    assert_close("against the full forward", results[0], logits(model, ids)[:, 7:9], 1e-5)


def test_output_holds_the_cache_under_the_installed_field_name():
    model = tiny_model("mag")
    with torch.no_grad():
        out = model(token_ids(T=5), use_cache=True)
        base = model.model(token_ids(T=5), use_cache=True)
    assert isinstance(getattr(out, LM_CACHE_FIELD), TitansCache)
    assert isinstance(getattr(base, MODEL_CACHE_FIELD), Cache)


def test_two_different_caches_are_an_error():
    model = tiny_model("lmm")
    with pytest.raises(ValueError, match="`past_key_values`.*`cache`"):
        model(token_ids(T=5), use_cache=True, past_key_values=TitansCache(), cache=TitansCache())
    layer = NeuralMemory(32, 2, layer_idx=0)
    with pytest.raises(ValueError, match="two different caches"):
        layer(torch.randn(1, 4, 32), past_key_values=Cache(), cache=Cache(), use_cache=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_layers_take_the_cache_as_cache(variant):
    """A block's mixer given the cache as ``cache`` writes and reads it as under ``past_key_values``."""
    model = tiny_model(variant)
    x = torch.randn(2, 7, 32)
    mixer = model.model.layers[0].mixer
    outs = []
    for name in ("past_key_values", "cache"):
        cache = Cache()
        with torch.no_grad():
            mixer(x[:, :5], use_cache=True, **{name: cache})
            outs.append(mixer(x[:, 5:], use_cache=True, **{name: cache})[0])
        assert cache.get_seq_length() == 7
    assert_close(f"{variant} mixer decoding from `cache`", outs[1], outs[0], 0.0)

