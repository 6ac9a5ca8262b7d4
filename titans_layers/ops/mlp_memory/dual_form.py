"""The dual form of the MLP-memory update as one ``autograd.Function`` with a hand-written
backward: the engine of ``naive_chunk_mlp_memory``, the MLP memory's CPU execution path.

Notation (module docstring of :mod:`~titans_layers.ops.mlp_memory.naive`): per chunk, ``Z = K a1``,
``Hk = act(Z)``, ``Err = Hk a2 (+ K) - V``, ``D = Err a2^T``, ``Delta = D * act'(Z)``, the written
rows ``X1 = step * Delta`` and ``X2 = step * Err``; the chunk-start states are kept as pairs
``WS1 = (W1, S1)`` ``[N, H, 2, K, Dh]`` and ``WS2 = (W2, S2)`` ``[N, H, 2, Dh, V]``, which the chunk's
gates mix with ``M = [[A_c, B_c], [0, E_c]]`` (``new_i = sum_j M[i, j] old_j``), and into which
the chunk writes ``(g, h) * X`` through ``K^T`` and ``Hk^T``.

Only the writes are sequential: a chunk's anchor is the previous chunk's end weights. So

- forward: a loop over chunks computes the writes and the chunk-end states (three matmuls for the
  gradients, two for the writes); then every query of a block of chunks reads its per-token
  weights at once, batched over the block's chunks;
- backward: the reads' backward is batched over all chunks (it needs only forward quantities);
  then a reverse loop carries the state gradients from each chunk's end to its start, through
  its writes and its anchor; what is left per token (k, v, theta, the gate rows) is batched again.

Autograd over the chunk loop of the same algebra keeps a dozen tensors per chunk and walks a
long graph of small ops; this backward keeps, per chunk, the four chunk-start weights and, per
token, ``Z``, ``Err``, ``D`` and the query pre-activations ``Zq``.

Not twice differentiable (``once_differentiable``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from titans_layers.ops.common.clipping import clipped_step
from titans_layers.ops.mlp_memory.activations import act, act_grad2, act_vjp

# Without gradients the chunk-start states of a block of chunks live only while its queries read
# them; a block holds about this many bytes of them.
_BLOCK_BYTES = 16 << 20


def _mix(M: torch.Tensor, WS: torch.Tensor) -> torch.Tensor:
    """``new_i = sum_j M[i, j] WS_j``: M ``[N, H, 2, 2]``, WS ``[N, H, 2, R, S]`` -> ``[N, H, 2, R, S]``."""
    return (M @ WS.flatten(-2)).view_as(WS)


def _mix_add(M, WS, L, R, out=None, alpha=1):
    """``_mix(M, WS) + alpha * L @ R_i`` in one batched GEMM: L ``[N, H, R0, C]`` (shared by both
    states), R ``[N, H, 2, C, R1]``, WS ``[N, H, 2, R0, R1]``; into ``out`` (shaped as WS) if given."""
    N, H = WS.shape[:2]
    L = L.unsqueeze(2).expand(N, H, 2, *L.shape[-2:])
    result = torch.baddbmm(_mix(M, WS).flatten(0, 2), L.flatten(0, 2), R.flatten(0, 2), alpha=alpha,
                           out=None if out is None else out.view(-1, *out.shape[-2:]))
    return result.view_as(WS)


def _write_norm(Kn, Delta, Hk, Err) -> torch.Tensor:
    """``||G_t||`` of each token's rank-one gradients: ``sqrt(|k|^2 |delta|^2 + |h|^2 |err|^2)`` ``[N, H, C]``."""
    return (Kn.square().sum(-1) * Delta.square().sum(-1) + Hk.square().sum(-1) * Err.square().sum(-1)).sqrt()


def _write_chunk(Kn, target, theta, gh, M, WS1, WS2, a1, a2, activation, max_update_norm, out1, out2):
    """One chunk's writes, taken at its anchor weights ``(a1, a2)``, and the states at its end.

    Kn ``[N, H, C, K]``; target ``[N, H, C, V]`` (v, minus k with the residual); theta ``[N, H, C]``;
    gh ``[N, H, 2, C]`` (each write's weight in the chunk-end W and S); M ``[N, H, 2, 2]``;
    WS1 ``[N, H, 2, K, Dh]``, WS2 ``[N, H, 2, Dh, V]`` at the chunk start; a1 ``[N, H, K, Dh]``,
    a2 ``[N, H, Dh, V]``. The chunk-end states go into ``out1`` and ``out2`` (shaped as WS1, WS2).
    Returns ``(Z, Hk, Err, D, Delta, step, norm)``, ``norm`` the write norm (None without clipping).
    """
    Z = Kn @ a1  # [N, H, C, Dh]
    Hk = act(Z, activation)
    Err = Hk @ a2 - target  # [N, H, C, V]
    D = Err @ a2.mT  # [N, H, C, Dh]
    Delta = act_vjp(D, Z, activation)
    norm = None
    step = theta
    if max_update_norm is not None:
        norm = _write_norm(Kn, Delta, Hk, Err)
        step = clipped_step(theta, norm, max_update_norm)
    w = (gh * step.unsqueeze(-2)).unsqueeze(-1)  # [N, H, 2, C, 1]
    _mix_add(M, WS1, Kn.mT, w * Delta.unsqueeze(2), out=out1, alpha=-1)  # [N, H, 2, K, Dh]
    _mix_add(M, WS2, Hk.mT, w * Err.unsqueeze(2), out=out2, alpha=-1)  # [N, H, 2, Dh, V]
    return Z, Hk, Err, D, Delta, step, norm


def _read(Q, WS1s, WS2s, AB, P1, Gamma, Hk, X1, X2, activation):
    """Every query of a run of chunks, at its own per-token weights.

    Q ``[n, N, H, C, K]``; WS1s ``[n, N, H, 2, K, Dh]``, WS2s ``[n, N, H, 2, Dh, V]`` chunk-start
    states; AB ``[n, N, H, 2, C, 1]`` (weights of W_0 and S_0 in W_t); P1 ``(Q K^T) * Gamma`` and
    Gamma ``[n, N, H, C, C]``; Hk, X1 ``[n, N, H, C, Dh]``; X2 ``[n, N, H, C, V]``.
    Returns ``(Zq, o)``: ``[n, N, H, C, Dh]`` and ``[n, N, H, C, V]`` (without the residual).
    """
    Zq = (AB * (Q.unsqueeze(3) @ WS1s)).sum(3) - P1 @ X1
    Hq = act(Zq, activation)
    o = (AB * (Hq.unsqueeze(3) @ WS2s)).sum(3) - ((Hq @ Hk.mT) * Gamma) @ X2
    return Zq, o


def _read_backward(dO, Q, K, starts1, starts2, AB, Gamma, Zq, Hk, X1, X2, activation):
    """Backward of :func:`_read` over all chunks at once (shapes as there, dO like o), except
    into the chunk-start states, which the reverse loop takes chunk by chunk from ``Hq``,
    ``AB * dO`` and ``AB * dZq``.

    Returns dQ, dK ``[NC, N, H, C, K]``; dAB ``[NC, N, H, 2, C]``; dGamma ``[NC, N, H, C, C]``; the
    reads' gradients of X1, X2 and Hk; Hq ``[NC, N, H, C, Dh]``; ``AB * dZq`` ``[NC, N, H, 2, C, Dh]``
    and ``AB * dO`` ``[NC, N, H, 2, C, V]``.
    """
    Hq = act(Zq, activation)
    # o = sum_i AB_i (Hq @ WS2_i) - (R2 * Gamma) @ X2,   R2 = Hq Hk^T
    dOW = dO.unsqueeze(3) @ starts2.mT  # [NC, N, H, 2, C, Dh]
    dAB = (dOW * Hq.unsqueeze(3)).sum(-1)  # [NC, N, H, 2, C]
    R2 = Hq @ Hk.mT  # [NC, N, H, C, C]
    dP2 = -(dO @ X2.mT)
    dGamma = dP2 * R2
    dR2 = dP2 * Gamma
    dZq = act_vjp((AB * dOW).sum(3) + dR2 @ Hk, Zq, activation)  # [NC, N, H, C, Dh]
    dHk = dR2.mT @ Hq
    dX2 = -((R2 * Gamma).mT @ dO)
    # Zq = sum_i AB_i (Q @ WS1_i) - (R1 * Gamma) @ X1,   R1 = Q K^T
    dZW = dZq.unsqueeze(3) @ starts1.mT  # [NC, N, H, 2, C, K]
    dAB += (dZW * Q.unsqueeze(3)).sum(-1)
    R1 = Q @ K.mT
    dP1 = -(dZq @ X1.mT)
    dGamma += dP1 * R1
    dR1 = dP1 * Gamma
    dQ = (AB * dZW).sum(3) + dR1 @ K
    dK = dR1.mT @ Q
    dX1 = -((R1 * Gamma).mT @ dZq)
    return dQ, dK, dAB, dGamma, dX1, dX2, dHk, Hq, AB * dZq.unsqueeze(3), AB * dO.unsqueeze(3)


def _mixing(A, Bv, E) -> torch.Tensor:
    """Each chunk's state mixing ``M = [[A_c, B_c], [0, E_c]]`` ``[NC, N, H, 2, 2]`` from its gates
    ``[NC, N, H, C]``."""
    A_c, B_c, E_c = A[..., -1], Bv[..., -1], E[..., -1]  # [NC, N, H]
    return torch.stack([torch.stack([A_c, B_c], -1), torch.stack([torch.zeros_like(E_c), E_c], -1)], -2)


def _where_rows(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the rows where ``rows`` ``[N, 1, 1, 1]`` is True, 0 elsewhere."""
    return torch.where(rows, x, torch.zeros((), dtype=x.dtype, device=x.device))


class MLPDualForm(torch.autograd.Function):
    """The chunk loop of ``naive_chunk_mlp_memory`` (inputs already padded and chunked).

    Every per-chunk tensor is chunk-major (the chunk index first), so that one chunk's slice is
    contiguous. Inputs: Q, K ``[NC, N, H, C, K]``; V ``[NC, N, H, C, V]``; theta, A, Bv, E, h
    ``[NC, N, H, C]`` and Gamma ``[NC, N, H, C, C]`` (:class:`~titans_layers.ops.common.chunk_gates.ChunkGates`,
    ``h`` squeezed); the initial W1, S1, anchor a1 ``[N, H, K, Dh]`` and W2, S2, a2 ``[N, H, Dh, V]``
    (expanded views are fine); ``last_chunk``: per row, the chunk that holds its last token (NC when
    it ends on a boundary); activation; residual; max_update_norm; ``save``: keep what the backward
    needs (every chunk-start state; else only a block of them lives at a time), decided by the
    caller (:func:`~titans_layers.ops.common.grad_mode.needs_grad`).

    Outputs: o ``[NC, N, H, C, V]``; the final W1, S1, W2, S2; the anchors of each row's last chunk.
    """

    @staticmethod
    def forward(ctx, Q, K, V, theta, A, Bv, E, Gamma, h, W1, S1, W2, S2, a1, a2, last_chunk, activation, residual,
                max_update_norm, save):
        NC, N, H, C, _ = Q.shape
        target = V - K if residual else V  # Err = Hk a2 - target
        gh = torch.stack([Gamma[..., -1, :], h], dim=-2)  # [NC, N, H, 2, C]
        M = _mixing(A, Bv, E)  # [NC, N, H, 2, 2]
        AB = torch.stack([A, Bv], dim=-2).unsqueeze(-1)  # [NC, N, H, 2, C, 1]
        P1 = (Q @ K.mT) * Gamma  # [NC, N, H, C, C]
        chunk_bytes = 2 * (W1.numel() + W2.numel()) * W1.element_size()
        block = NC if save else max(1, min(NC, _BLOCK_BYTES // chunk_bytes))
        # states at the chunk starts of a block, and at its end: [block + 1, N, H, 2, K, Dh], [.., 2, Dh, V]
        starts1 = W1.new_empty(block + 1, N, H, 2, *W1.shape[-2:])
        starts2 = W2.new_empty(block + 1, N, H, 2, *W2.shape[-2:])
        starts1[0, :, :, 0], starts1[0, :, :, 1], starts2[0, :, :, 0], starts2[0, :, :, 1] = W1, S1, W2, S2
        ends = torch.tensor(last_chunk, device=Q.device).view(N, 1, 1, 1)
        anchor1, anchor2 = final_a1, final_a2 = a1, a2
        names = ("Z", "Hk", "Err", "D", "Delta", "step", "norm")
        outs = []
        for lo in range(0, NC, block):
            hi = min(NC, lo + block)
            if lo > 0:  # a new block starts from the last one's end
                starts1[0], starts2[0] = starts1[block], starts2[block]
            cols = {name: [] for name in names}
            for n in range(lo, hi):
                WS1, WS2 = starts1[n - lo], starts2[n - lo]
                if n > 0:
                    anchor1, anchor2 = WS1[:, :, 0], WS2[:, :, 0]
                    if n in last_chunk:
                        final_a1 = torch.where(ends == n, anchor1, final_a1)
                        final_a2 = torch.where(ends == n, anchor2, final_a2)
                res = _write_chunk(K[n], target[n], theta[n], gh[n], M[n], WS1, WS2,
                                   anchor1, anchor2, activation, max_update_norm, starts1[n - lo + 1],
                                   starts2[n - lo + 1])
                for name, value in zip(names, res):
                    cols[name].append(value)
            col = {name: torch.stack(v) for name, v in cols.items() if v[0] is not None}  # [n, N, H, C, *]
            s = col["step"].unsqueeze(-1)
            Zq, o = _read(Q[lo:hi], starts1[:hi - lo], starts2[:hi - lo], AB[lo:hi],
                          P1[lo:hi], Gamma[lo:hi], col["Hk"], s * col["Delta"], s * col["Err"], activation)
            outs.append(o)
        last = starts1[NC - lo], starts2[NC - lo]  # the final states
        if NC in last_chunk:
            final_a1 = torch.where(ends == NC, last[0][:, :, 0], final_a1)
            final_a2 = torch.where(ends == NC, last[1][:, :, 0], final_a2)
        o = torch.cat(outs)  # [NC, N, H, C, V]
        if residual:
            o = o + Q
        if save:  # one block: its columns hold every chunk
            ctx.save_for_backward(Q, K, theta, A, Bv, Gamma, gh, M, a1, a2, col["Z"], col["Err"], col["D"],
                                  col["step"], Zq, starts1, starts2, col.get("norm"))
            ctx.config = (list(last_chunk), activation, residual, max_update_norm)
        # copies: the outputs must not alias the saved states
        return (o, last[0][:, :, 0].clone(), last[0][:, :, 1].clone(), last[1][:, :, 0].clone(),
                last[1][:, :, 1].clone(), final_a1.clone(), final_a2.clone())

    @staticmethod
    @once_differentiable
    def backward(ctx, dO, dW1, dS1, dW2, dS2, dA1, dA2):
        Q, K, theta, A, Bv, Gamma, gh, M, a1, a2, Z, Err, D, step, Zq, starts1, starts2, norm = ctx.saved_tensors
        last_chunk, activation, residual, c = ctx.config
        NC, N, H, C, _ = Q.shape
        Hk, app = act(Z, activation), act_grad2(Z, activation)  # [NC, N, H, C, Dh]
        Delta = act_vjp(D, Z, activation)
        s = step.unsqueeze(-1)  # [NC, N, H, C, 1]
        X1, X2 = s * Delta, s * Err
        AB = torch.stack([A, Bv], dim=-2).unsqueeze(-1)  # [NC, N, H, 2, C, 1]
        dQ, dK, dAB, dGamma, dX1r, dX2r, dHkr, Hq, ABdZq, ABdO = _read_backward(
            dO, Q, K, starts1[:NC], starts2[:NC], AB, Gamma, Zq, Hk, X1, X2, activation)
        clipped = None
        if c is not None:  # where clipped, step = c / ||G||: its gradient flows into ||G||, none into theta
            clipped = theta * norm > c
            safe = torch.where(clipped, norm, torch.ones_like(norm))
            coef = torch.where(clipped, -step / safe.square(), torch.zeros_like(step))  # d step / d||G|| / ||G||
            k2, d2 = K.square().sum(-1, keepdim=True), Delta.square().sum(-1, keepdim=True)
            h2, e2 = Hk.square().sum(-1, keepdim=True), Err.square().sum(-1, keepdim=True)

        ends = torch.tensor(last_chunk, device=Q.device).view(N, 1, 1, 1)
        G1, G2 = torch.stack([dW1, dS1], 2), torch.stack([dW2, dS2], 2)  # gradients of the chunk-end states
        if NC in last_chunk:
            G1[:, :, 0] += _where_rows(ends == NC, dA1)
            G2[:, :, 0] += _where_rows(ends == NC, dA2)
        dZ, dErr, dstep = torch.empty_like(Z), torch.empty_like(Err), torch.empty_like(step)
        dgh, dM = torch.empty_like(gh), torch.empty_like(M)
        for n in reversed(range(NC)):
            Kn, Hkn, Dn, Deltan, Errn, sn = K[n], Hk[n], D[n], Delta[n], Err[n], s[n]
            WS1, WS2 = starts1[n], starts2[n]  # [N, H, 2, K, Dh], [N, H, 2, Dh, V]
            a1n, a2n = (WS1[:, :, 0], WS2[:, :, 0]) if n > 0 else (a1, a2)
            w = gh[n].unsqueeze(-1)  # [N, H, 2, C, 1]
            # the chunk's writes into its end states: WS1 -= K^T (w X1), WS2 -= Hk^T (w X2)
            KG = Kn.unsqueeze(2) @ G1  # [N, H, 2, C, Dh]
            HG = Hkn.unsqueeze(2) @ G2  # [N, H, 2, C, V]
            dX1 = dX1r[n] - (w * KG).sum(2)
            dX2 = dX2r[n] - (w * HG).sum(2)
            dHk = dHkr[n] - ((w * X2[n].unsqueeze(2)) @ G2.mT).sum(2)  # [N, H, C, Dh]
            dK[n] -= ((w * X1[n].unsqueeze(2)) @ G1.mT).sum(2)
            dgh[n] = -(KG * X1[n].unsqueeze(2)).sum(-1) - (HG * X2[n].unsqueeze(2)).sum(-1)
            # X1 = step * Delta, X2 = step * Err
            dDelta, dE = sn * dX1, sn * dX2
            dstep[n] = (dX1 * Deltan).sum(-1) + (dX2 * Errn).sum(-1)
            if clipped is not None:
                r = coef[n, ..., None] * dstep[n, ..., None]  # [N, H, C, 1]
                dDelta = dDelta + (r * k2[n]) * Deltan
                dE = dE + (r * h2[n]) * Errn
                dHk = dHk + (r * e2[n]) * Hkn
                dK[n] += (r * d2[n]) * Kn
            # Delta = (Err a2^T) * act'(Z); Err = act(Z) a2 - target; Z = K a1
            dD = act_vjp(dDelta, Z[n], activation)
            dE = dE + dD @ a2n
            da2 = dD.mT @ Errn + Hkn.mT @ dE  # [N, H, Dh, V]
            dZn = act_vjp(dHk + dE @ a2n.mT, Z[n], activation) + dDelta * Dn * app[n]
            da1 = Kn.mT @ dZn  # [N, H, K, Dh]
            dZ[n], dErr[n] = dZn, dE
            # back to the chunk start: through the gates' mixing, the reads, and the anchor
            dM[n] = G1.flatten(-2) @ WS1.flatten(-2).mT + G2.flatten(-2) @ WS2.flatten(-2).mT
            G1 = _mix_add(M[n].mT, G1, Q[n].mT, ABdZq[n])
            G2 = _mix_add(M[n].mT, G2, Hq[n].mT, ABdO[n])
            if n > 0:
                G1[:, :, 0] += da1
                G2[:, :, 0] += da2
                if n in last_chunk:
                    G1[:, :, 0] += _where_rows(ends == n, dA1)
                    G2[:, :, 0] += _where_rows(ends == n, dA2)
        if 0 in last_chunk:  # da1, da2 of the first chunk: its anchor is the initial one
            da1 = da1 + _where_rows(ends == 0, dA1)
            da2 = da2 + _where_rows(ends == 0, dA2)

        dK[0] += dZ[0] @ a1.mT
        dK[1:] += dZ[1:] @ starts1[1:NC, :, :, 0].mT
        dV = -dErr
        if residual:
            dQ += dO
            dK += dErr
        dtheta = dstep if clipped is None else torch.where(clipped, torch.zeros_like(dstep), dstep)
        dA, dBv, dE_gate = dAB[:, :, :, 0], dAB[:, :, :, 1], torch.zeros_like(A)
        dA[..., -1] += dM[..., 0, 0]
        dBv[..., -1] += dM[..., 0, 1]
        dE_gate[..., -1] = dM[..., 1, 1]
        dGamma[..., -1, :] += dgh[:, :, :, 0]
        return (dQ, dK, dV, dtheta, dA, dBv, dE_gate, dGamma, dgh[:, :, :, 1], G1[:, :, 0], G1[:, :, 1],
                G2[:, :, 0], G2[:, :, 1], da1, da2, None, None, None, None, None)
