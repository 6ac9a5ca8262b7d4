"""Two independent oracles from fla for the token-level (C = 1) case (SPEC §1)."""

import pytest
import torch

from titans_layers.ops import (fused_recurrent_momentum_delta_rule, naive_chunk_momentum_delta_rule,
                               naive_recurrent_momentum_delta_rule)
from titans_layers.testing import assert_close, make_case

fla_delta = pytest.importorskip("fla.ops.delta_rule.naive")
fla_momentum = pytest.importorskip("fla.ops.momentum_delta_rule.naive")

TOKEN_LEVEL = [naive_recurrent_momentum_delta_rule, naive_chunk_momentum_delta_rule,
               fused_recurrent_momentum_delta_rule]


@pytest.mark.parametrize("op", TOKEN_LEVEL, ids=lambda f: f.__name__)
def test_no_momentum_no_decay_is_fla_delta_rule(op, device):
    """C = 1, eta = alpha = 0: the delta rule with beta = theta."""
    case = make_case(seed=11, B=2, T=37, H=3, K=16, V=24, dtype=torch.float32, chunk_size=1, state="M",
                     device=device)
    q, k, v, _, _, theta = case.inputs
    zeros = torch.zeros_like(theta)
    K = q.shape[-1]
    # fla's reference scales q by K ** -0.5 internally; ours does not scale
    o, state = op(q * K ** -0.5, k, v, zeros, zeros, theta, chunk_size=1, initial_state=case.initial_state,
                  output_final_state=True)
    heads_first = lambda x: x.transpose(1, 2).cpu()  # [B, T, H, *] -> [B, H, T, *]
    o_ref, M_ref = fla_delta.delta_rule_recurrence(heads_first(q), heads_first(k), heads_first(v),
                                                   theta.transpose(1, 2).cpu(),
                                                   initial_state=case.initial_state[0].cpu(),
                                                   output_final_state=True)
    assert_close("o vs fla delta rule", o.cpu(), o_ref.transpose(1, 2), 1e-5)
    assert_close("M vs fla delta rule", state.M.cpu(), M_ref, 1e-5)


@pytest.mark.parametrize("op", TOKEN_LEVEL, ids=lambda f: f.__name__)
def test_token_level_update_is_fla_momentum_reference(op, device):
    """C = 1 in general: fla's recurrent_momentum_delta_rule_ref with log_alpha = log(1 - alpha),
    log_mu = log(eta), eta = theta, beta = 1, p = k, scale = 1; its state [S, M] is our (M, -S)."""
    case = make_case(seed=5, B=2, T=41, H=2, K=12, V=20, dtype=torch.float32, chunk_size=1, extremes=0.0,
                     state="MS", device=device)
    q, k, v, alpha, eta, theta = case.inputs
    eta = eta.clamp(min=0.05)  # fla's reference takes logs of the gates
    o, state = op(q, k, v, alpha, eta, theta, chunk_size=1, initial_state=case.initial_state, output_final_state=True)
    M0, S0 = case.initial_state
    cpu = lambda x: x.cpu()
    o_ref, final = fla_momentum.recurrent_momentum_delta_rule_ref(
        q=cpu(q), k=cpu(k), v=cpu(v), log_alpha=torch.log1p(-cpu(alpha)), log_mu=torch.log(cpu(eta)), p=cpu(k),
        beta=torch.ones_like(cpu(theta)), eta=cpu(theta), scale=1.0, initial_S=cpu(M0), initial_M=-cpu(S0),
        output_final_state=True)
    assert_close("o vs fla momentum reference", o.cpu(), o_ref, 1e-5)
    assert_close("M vs fla momentum reference", state.M.cpu(), final[0], 1e-5)
    assert_close("S vs fla momentum reference", state.S.cpu(), -final[1], 1e-5)
