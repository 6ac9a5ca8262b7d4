"""The dual form of the MLP-memory update as one ``autograd.Function`` with a hand-written
backward: the engine of ``naive_chunk_mlp_memory``, the MLP memory's CPU execution path.

Notation (module docstring of :mod:`~titans_layers.ops.mlp_memory.naive`): per chunk, ``Z = K a1``,
``Hk = act(Z)``, ``Err = Hk a2 (+ K) - V``, ``D = Err a2^T``, ``Delta = D * act'(Z)``, the written
rows ``X1 = step * Delta`` and ``X2 = step * Err``.

Each weight and its momentum are kept side by side, ``P1 = [W1 | S1]`` ``[N, H, K, 2 Dh]`` and
``P2 = [W2 | S2]`` ``[N, H, Dh, 2 V]``, so that one matmul serves both halves:

- a chunk's writes: ``P_end = mix(P_start) - L^T [g X | h X]`` (``L`` = K for the first layer, Hk
  for the second; ``g``, ``h`` each write's weight in the chunk-end W and S), one GEMM per layer,
  with ``mix([W | S]) = [A_c W + B_c S | E_c S]`` from the chunk's gates;
- a query's read: ``Q P1 = [Q W1 | Q S1]``, then ``Zq = A * (Q W1) + B * (Q S1) - P1m X1``.

Only the writes are sequential: a chunk's anchor is the previous chunk's end weights. So

- forward: a loop over chunks computes the writes (three matmuls for the gradients, one per layer
  for the states); then every query of a block of chunks reads its per-token weights at once;
- backward, block by block from the last: the block's chunk-start states are recomputed from its
  first one (its writes again, two GEMMs a chunk); its reads' backward is batched over its chunks
  (it needs only forward quantities); then a reverse loop carries the state gradients from each
  chunk's end to its start, through its writes and its anchor.

A block holds at least about ``_BLOCK_BYTES`` of chunk-start states, which stay in cache between
its writes and its reads. Both loops run a dozen small ops per chunk on views made up front (batch
and heads flattened), into preallocated buffers; at small chunk sizes the passes over the states
bound them. For the backward the forward keeps each block's first states and, per token, ``Z``,
``Err``, ``D`` and the query pre-activations ``Zq``; with gradients a block holds of the order
of ``sqrt(NC)`` chunks (:func:`_block_chunks`), so checkpoints and ring grow as ``sqrt(T)``.
Not twice differentiable (``once_differentiable``). Measured memory and speed of this design:
docs/dual_form.md.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from titans_layers.ops.common.clipping import clipped_step
from titans_layers.ops.mlp_memory.activations import act, act_derivatives, act_vjp

# The queries of a block of chunks read at once, after its writes, while the block's chunk-start
# states (about this many bytes) are still in cache; without gradients only a block's states live.
# Batching more chunks' reads pays at small chunk sizes (timings: docs/dual_form.md).
_BLOCK_BYTES = 4 << 20


def _mm(a, b, add=None, alpha=1):
    """``alpha * a @ b (+ add)`` over any leading dims (flattened into one batch of GEMMs).

    a ``[..., m, k]``, b ``[..., k, n]`` -> ``[..., m, n]``."""
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    if add is not None:
        r = torch.baddbmm(add.reshape(-1, *add.shape[-2:]), a3, b3, alpha=alpha)
    else:
        r = torch.bmm(a3, b3)
        if alpha != 1:
            r.mul_(alpha)
    return r.view(*a.shape[:-2], *r.shape[-2:])


def _mm_acc(out, a, b, alpha=1):
    """``out += alpha * a @ b`` in place (shapes as :func:`_mm`); returns ``out``."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), alpha=alpha)
    return out


def _chunks(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``[n, N, H, *rest]`` -> the n per-chunk views ``[N * H, *rest]``."""
    return x.flatten(1, 2).unbind(0)


def _heads_flat(x: torch.Tensor, N: int, H: int) -> torch.Tensor:
    """``[N or 1, H, R, S]`` (an expanded view is fine) -> ``[N * H, R, S]``."""
    return x.expand(N, H, *x.shape[-2:]).reshape(N * H, *x.shape[-2:])


def _state_views(starts: torch.Tensor):
    """Per-chunk views of chunk-start states ``[n, N, H, R, 2 S]``: the pairs ``[N * H, R, 2 S]``, the
    same as ``[N * H, R, 2, S]``, and their weight and momentum halves ``[N * H, R, S]``."""
    flat = starts.flatten(1, 2)
    pair = _pair(flat)
    return flat.unbind(0), pair.unbind(0), pair[..., 0, :].unbind(0), pair[..., 1, :].unbind(0)


def _block_chunks(NC: int, state_bytes: int, temp_bytes: int, save: bool) -> int:
    """How many chunks a block holds, at least one, at most all NC.

    At least as many as keep about ``_BLOCK_BYTES`` of chunk-start states (``state_bytes`` a chunk)
    in cache. With ``save`` (a backward follows) more where that saves memory: the backward holds
    ``NC / block`` checkpoints, a ring of ``block + 1`` states and the block's temporaries
    (``temp_bytes`` a chunk), least at ``block = sqrt(NC * state_bytes / (state_bytes + temp_bytes))``.
    Half that block needs 1.25x that memory for half the ring, which stays in cache longer and
    runs faster (timings: docs/dual_form.md).
    """
    block = max(1, _BLOCK_BYTES // state_bytes)
    if save:
        block = max(block, round(math.sqrt(NC * state_bytes / (state_bytes + temp_bytes)) / 2))
    return min(NC, block)


class _StateRing:
    """A block's chunk-start states of one layer, ``P = [W | S]`` ``[block + 1, N, H, R, 2 S]``, as
    per-slot views with batch and heads flattened (``[N * H, R, 2 S]``, its pair view
    ``[N * H, R, 2, S]``, and the halves ``[N * H, R, S]``)."""

    def __init__(self, starts: torch.Tensor):
        self.flat, self.pair, self.weight, self.momentum = _state_views(starts)

    def advance(self, i: int, ae, b, LT, spread) -> None:
        """Slot ``i + 1`` = slot ``i`` after a chunk: ``[A_c W + B_c S | E_c S] - L^T [g X | h X]``, with
        ae ``[NH, 1, 2, S]`` = (A_c, E_c), b ``[NH, 1, S]`` = B_c, ``LT`` ``[NH, R, C]`` and ``spread``
        = ``[g X | h X]`` ``[NH, C, 2 S]``."""
        torch.mul(self.pair[i], ae, out=self.pair[i + 1])
        self.weight[i + 1].addcmul_(self.momentum[i], b)
        self.flat[i + 1].baddbmm_(LT, spread, alpha=-1)


def _pair(P: torch.Tensor) -> torch.Tensor:
    """``[..., 2 S]`` -> ``[..., 2, S]``: the weight half and the momentum half (a view)."""
    return P.unflatten(-1, (2, P.shape[-1] // 2))


def _combine(xW: torch.Tensor, xS: torch.Tensor, A: torch.Tensor, B: torch.Tensor, out=None) -> torch.Tensor:
    """``A * xW + B * xS`` for rows ``[..., C, S]`` and A, B ``[..., C]`` (into ``out`` if given)."""
    return torch.addcmul(xW * A.unsqueeze(-1), xS, B.unsqueeze(-1), out=out)


def _weighted(PP: torch.Tensor, A: torch.Tensor, B: torch.Tensor, out=None) -> torch.Tensor:
    """``A * PP_W + B * PP_S`` for rows ``PP = [PP_W | PP_S]`` ``[..., C, 2 S]``, A and B ``[..., C]``."""
    S = PP.shape[-1] // 2
    return _combine(PP[..., :S], PP[..., S:], A, B, out=out)


class _GradPair:
    """Gradients of a state pair ``[W | S]`` ``[N * H, R, 2 S]`` with views of its halves."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat
        self.pair = _pair(flat)  # [NH, R, 2, S]
        self.weight, self.momentum = self.pair[..., 0, :], self.pair[..., 1, :]

    def mix_transposed_into(self, out: "_GradPair", ae, b) -> "_GradPair":
        """The adjoint of a chunk's state mixing ``[W | S] -> [A_c W + B_c S | E_c S]``:
        ``out = [A_c G_W | B_c G_W + E_c G_S]``; ae ``[NH, 1, 2, S]`` holds ``(A_c, E_c)``, b
        ``[NH, 1, S]`` holds ``B_c``."""
        torch.mul(self.pair, ae, out=out.pair)
        out.momentum.addcmul_(self.weight, b)
        return out

    def add_to_weight(self, rows, x):
        """``G_W += x`` on the rows where ``rows`` ``[N, 1, 1, 1]`` is True (x ``[N, H, R, S]``)."""
        self.weight.add_(_where_rows(rows, x).flatten(0, 1))


def _pair_products(G, P):
    """``[[<G_W, W>, <G_W, S>], [<G_S, W>, <G_S, S>]]`` ``[NH, 2, 2]`` for ``G``, ``P`` ``[NH, R, 2 S]``."""
    NH, R, S2 = G.shape
    g, p = G.view(NH * R, 2, S2 // 2), P.view(NH * R, 2, S2 // 2)
    return torch.bmm(g, p.mT).view(NH, R, 2, 2).sum(1)


def _write_norm(Kn, Delta, Hk, Err) -> torch.Tensor:
    """``||G_t||`` of each token's rank-one gradients: ``sqrt(|k|^2 |delta|^2 + |h|^2 |err|^2)`` ``[..., C]``."""
    return (Kn.square().sum(-1) * Delta.square().sum(-1) + Hk.square().sum(-1) * Err.square().sum(-1)).sqrt()


def _mixing(A, Bv, E):
    """Each chunk's state mixing from its gates ``[NC, N, H, C]``: ``(A_c, E_c)`` ``[NC, N, H, 1, 2, 1]``
    and ``B_c`` ``[NC, N, H, 1, 1]``."""
    ae = torch.stack([A[..., -1], E[..., -1]], dim=-1)  # [NC, N, H, 2]
    return ae[..., None, :, None], Bv[..., -1, None, None]


def _mixing_rows(ae, b, S: int):
    """Per-chunk views of a run of chunks' mixing coefficients spelled out along a state row of
    width S, ``[NH, 1, 2, S]`` and ``[NH, 1, S]`` (broadcasting only over rows is faster).
    Made a block at a time: for every chunk at once they take ``3 (Dh + V) / C`` floats a token
    and head."""
    return _chunks(ae.expand(*ae.shape[:-1], S).contiguous()), _chunks(b.expand(*b.shape[:-1], S).contiguous())


def _where_rows(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the rows where ``rows`` ``[N, 1, 1, 1]`` is True, 0 elsewhere."""
    return torch.where(rows, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _read(Q, starts1, starts2, A, Bv, P1m, Gamma, Hk, X1, X2, activation, Zq, o):
    """Every query of a run of chunks, at its own per-token weights.

    Q ``[n, N, H, C, K]``; starts1 ``[n, N, H, K, 2 Dh]``, starts2 ``[n, N, H, Dh, 2 V]`` chunk-start
    states; A, Bv ``[n, N, H, C]`` (weights of W_0 and S_0 in W_t); P1m ``(Q K^T) * Gamma`` and
    Gamma ``[n, N, H, C, C]``; Hk, X1 ``[n, N, H, C, Dh]``; X2 ``[n, N, H, C, V]``.
    Writes ``Zq`` ``[n, N, H, C, Dh]`` and ``o`` ``[n, N, H, C, V]`` (without the residual).
    """
    _mm_acc(_weighted(_mm(Q, starts1), A, Bv, out=Zq), P1m, X1, alpha=-1)
    Hq = act(Zq, activation)
    _mm_acc(_weighted(_mm(Hq, starts2), A, Bv, out=o), _mm(Hq, Hk.mT).mul_(Gamma), X2, alpha=-1)


def _read_backward(dO, Q, K, starts1, starts2, A, Bv, Gamma, Zq, Hk, X1, X2, activation):
    """Backward of :func:`_read` over all chunks at once (shapes as there, dO like o), except
    into the chunk-start states, which the reverse loop takes chunk by chunk: ``Q^T [A dZq | B dZq]``
    and ``Hq^T [A dO | B dO]``.

    Returns dQ, dK ``[NC, N, H, C, K]``; dA, dBv ``[NC, N, H, C]``; dGamma ``[NC, N, H, C, C]``;
    the reads' gradients of X1, X2 and Hk; Hq and dZq ``[NC, N, H, C, Dh]``.
    """
    Dh, Vd = Zq.shape[-1], dO.shape[-1]
    Hq = act(Zq, activation)
    # o = A (Hq W2) + B (Hq S2) - (R2 * Gamma) @ X2,   R2 = Hq Hk^T; each saved state is read once
    dOW, dOS = _mm(dO, starts2[..., :Vd].mT), _mm(dO, starts2[..., Vd:].mT)  # dO W2^T, dO S2^T [.., C, Dh]
    dA, dBv = (dOW * Hq).sum(-1), (dOS * Hq).sum(-1)  # [NC, N, H, C]
    R2 = _mm(Hq, Hk.mT)  # [NC, N, H, C, C]
    dP2 = _mm(dO, X2.mT, alpha=-1)
    dGamma = dP2 * R2
    dR2 = dP2.mul_(Gamma)
    dZq = act_vjp(_mm(dR2, Hk, add=_combine(dOW, dOS, A, Bv)), Zq, activation)  # [NC, N, H, C, Dh]
    dHk = _mm(dR2.mT, Hq)
    dX2 = _mm(R2.mul_(Gamma).mT, dO, alpha=-1)
    # Zq = A (Q W1) + B (Q S1) - (R1 * Gamma) @ X1,   R1 = Q K^T
    dZW, dZS = _mm(dZq, starts1[..., :Dh].mT), _mm(dZq, starts1[..., Dh:].mT)  # dZq W1^T, dZq S1^T [.., C, K]
    dA += (dZW * Q).sum(-1)
    dBv += (dZS * Q).sum(-1)
    R1 = _mm(Q, K.mT)
    dP1 = _mm(dZq, X1.mT, alpha=-1)
    dGamma += dP1 * R1
    dR1 = dP1.mul_(Gamma)
    dQ = _mm(dR1, K, add=_combine(dZW, dZS, A, Bv))
    dK = _mm(dR1.mT, Q)
    dX1 = _mm(R1.mul_(Gamma).mT, dZq, alpha=-1)
    return dQ, dK, dA, dBv, dGamma, dX1, dX2, dHk, Hq, dZq


class MLPDualForm(torch.autograd.Function):
    """The chunk loop of ``naive_chunk_mlp_memory`` (inputs already padded and chunked).

    Every per-chunk tensor is chunk-major (the chunk index first), so that one chunk's slice is
    contiguous. Inputs: Q, K ``[NC, N, H, C, K]``; V ``[NC, N, H, C, V]``; theta, A, Bv, E, h
    ``[NC, N, H, C]`` and Gamma ``[NC, N, H, C, C]`` (:class:`~titans_layers.ops.common.chunk_gates.ChunkGates`,
    ``h`` squeezed); the initial W1, S1, anchor a1 ``[N, H, K, Dh]`` and W2, S2, a2 ``[N, H, Dh, V]``
    (expanded views are fine); ``last_chunk``: per row, the chunk that holds its last token (NC when
    it ends on a boundary); activation; residual; max_update_norm; ``save``: keep what the backward
    needs (each block's first states and every token's Z, Err, D, Zq; else only a block's live at
    a time), decided by the caller (:func:`~titans_layers.ops.common.grad_mode.needs_grad`).

    Outputs: o ``[NC, N, H, C, V]``; the final W1, S1, W2, S2; the anchors of each row's last chunk.
    """

    @staticmethod
    def forward(ctx, Q, K, V, theta, A, Bv, E, Gamma, h, W1, S1, W2, S2, a1, a2, last_chunk, activation, residual,
                max_update_norm, save):
        NC, N, H, C, _ = Q.shape
        Dh, Vd = W1.shape[-1], W2.shape[-1]
        neg_target = K - V if residual else -V  # Err = Hk a2 + neg_target
        gh = torch.stack([Gamma[..., -1, :], h], dim=-1).unsqueeze(-1)  # [NC, N, H, C, 2, 1]
        ae, b = _mixing(A, Bv, E)
        P1m = _mm(Q, K.mT).mul_(Gamma)  # [NC, N, H, C, C]
        clip = max_update_norm is not None
        w = None if clip else gh * theta[..., None, None]  # each write's weight in W and S, step included
        # Chunks are written one by one and read a block at a time, while the block's chunk-start
        # states (a ring of block + 1, reused by every block) are in cache: [block + 1, N, H, K, 2Dh],
        # [.., Dh, 2V]. With save the backward gets each block's first state (a checkpoint it
        # recomputes the block's states from) and every chunk's Z, Err, D, Zq; else they live a block.
        # The backward's temporaries take about 40 Dh floats a token and head (docs/dual_form.md).
        block = _block_chunks(NC, 2 * (W1.numel() + W2.numel()) * W1.element_size(),
                              40 * N * H * C * Dh * Q.element_size(), save)
        kept = NC if save else block
        starts1 = W1.new_empty(block + 1, N, H, W1.shape[-2], 2 * Dh)
        starts2 = W2.new_empty(block + 1, N, H, Dh, 2 * Vd)
        starts1[0, ..., :Dh], starts1[0, ..., Dh:], starts2[0, ..., :Vd], starts2[0, ..., Vd:] = W1, S1, W2, S2
        if save:
            nblocks = -(-NC // block)
            check1 = starts1.new_empty(nblocks, *starts1.shape[1:])  # [nblocks, N, H, K, 2Dh]
            check2 = starts2.new_empty(nblocks, *starts2.shape[1:])  # [nblocks, N, H, Dh, 2V]
        # what each chunk's writes leave for its reads, and for the backward (Z, Err, D, step, norm, Zq)
        Z, D = Q.new_empty(kept, N, H, C, Dh), Q.new_empty(kept, N, H, C, Dh)
        Err = Q.new_empty(kept, N, H, C, Vd)
        step, norm = (Q.new_empty(kept, N, H, C), Q.new_empty(kept, N, H, C)) if clip else (None, None)
        Hk, Delta = Q.new_empty(block, N, H, C, Dh), Q.new_empty(block, N, H, C, Dh)
        Zq = Q.new_empty(kept, N, H, C, Dh)
        o = Q.new_empty(NC, N, H, C, Vd)
        ends = torch.tensor(last_chunk, device=Q.device).view(N, 1, 1, 1)
        final_a1, final_a2 = a1, a2
        # The chunk loop runs a dozen small ops per chunk; its per-chunk views are made up front,
        # with batch and heads flattened: [N * H, ...].
        NH = N * H
        Kc, KcT, tgt, Zc, Dc, Ec = (_chunks(x) for x in (K, K.mT, neg_target, Z, D, Err))
        Hc, Deltac, Eu, Deltau = (_chunks(x) for x in (Hk, Delta, Err.unsqueeze(-2), Delta.unsqueeze(-2)))
        gh3 = _chunks(gh)  # [NH, C, 2, 1]
        w3 = None if clip else _chunks(w)
        if clip:
            thc, stepc, normc = _chunks(theta), _chunks(step), _chunks(norm)  # [NH, C]
        P1, P2 = _StateRing(starts1), _StateRing(starts2)
        a1c, a2c = _heads_flat(a1, N, H), _heads_flat(a2, N, H)  # the initial anchors [NH, R, S]
        sp1, sp2 = Q.new_empty(NH, C, 2, Dh), Q.new_empty(NH, C, 2, Vd)  # [g X | h X] of each layer
        sp1f, sp2f = sp1.view(NH, C, 2 * Dh), sp2.view(NH, C, 2 * Vd)
        for lo in range(0, NC, block):
            hi = min(NC, lo + block)
            base = 0 if save else lo  # chunk n's slot in the kept buffers is n - base
            (ae1, b1), (ae2, b2) = _mixing_rows(ae[lo:hi], b[lo:hi], Dh), _mixing_rows(ae[lo:hi], b[lo:hi], Vd)
            if lo > 0:  # a new block starts from the last one's end
                starts1[0], starts2[0] = starts1[block], starts2[block]
            if save:
                check1[lo // block], check2[lo // block] = starts1[0], starts2[0]
            for n in range(lo, hi):
                j, i = n - base, n - lo  # chunk n's slot in the kept buffers and in the block's
                if n > 0:
                    an1, an2 = P1.weight[i], P2.weight[i]  # the anchor: this chunk's start weights
                    if n in last_chunk:
                        final_a1 = torch.where(ends == n, an1.unflatten(0, (N, H)), final_a1)
                        final_a2 = torch.where(ends == n, an2.unflatten(0, (N, H)), final_a2)
                else:
                    an1, an2 = a1c, a2c
                z = torch.bmm(Kc[n], an1, out=Zc[j])  # [NH, C, Dh]
                hk = act(z, activation, out=Hc[i])
                err = torch.baddbmm(tgt[n], hk, an2, out=Ec[j])  # [NH, C, V]
                delta = act_vjp(torch.bmm(err, an2.mT, out=Dc[j]), z, activation, out=Deltac[i])
                if clip:
                    normc[j].copy_(_write_norm(Kc[n], delta, hk, err))
                    stepc[j].copy_(clipped_step(thc[n], normc[j], max_update_norm))
                    wn = gh3[n] * stepc[j][..., None, None]
                else:
                    wn = w3[n]
                P1.advance(i, ae1[i], b1[i], KcT[n], torch.mul(Deltau[i], wn, out=sp1).view_as(sp1f))
                P2.advance(i, ae2[i], b2[i], hk.mT, torch.mul(Eu[j], wn, out=sp2).view_as(sp2f))
            m, r = hi - lo, slice(lo - base, hi - base)
            s = (step[r] if clip else theta[lo:hi]).unsqueeze(-1)  # [m, N, H, C, 1]
            _read(Q[lo:hi], starts1[:m], starts2[:m], A[lo:hi], Bv[lo:hi], P1m[lo:hi], Gamma[lo:hi], Hk[:m],
                  s * Delta[:m], s * Err[r], activation, Zq[r], o[lo:hi])
        last = starts1[NC - lo], starts2[NC - lo]  # the final states (lo: the last block's first chunk)
        if NC in last_chunk:
            final_a1 = torch.where(ends == NC, last[0][..., :Dh], final_a1)
            final_a2 = torch.where(ends == NC, last[1][..., :Vd], final_a2)
        if residual:
            o = o + Q
        if save:  # the kept buffers hold every chunk
            ctx.save_for_backward(Q, K, theta, A, Bv, Gamma, gh, ae, b, a1, a2, Z, Err, D,
                                  step if clip else theta, Zq, check1, check2, norm)
            ctx.config = (list(last_chunk), activation, residual, max_update_norm, block)
        # copies: contiguous outputs that do not keep the ring buffers alive
        return (o, last[0][..., :Dh].clone(), last[0][..., Dh:].clone(), last[1][..., :Vd].clone(),
                last[1][..., Vd:].clone(), final_a1.clone(), final_a2.clone())

    @staticmethod
    @once_differentiable
    def backward(ctx, dO, dW1, dS1, dW2, dS2, dA1, dA2):
        (Q, K, theta, A, Bv, Gamma, gh, ae, b, a1, a2, Z, Err, D, step, Zq, check1, check2,
         norm) = ctx.saved_tensors
        last_chunk, activation, residual, c, block = ctx.config
        NC, N, H, C, _ = Q.shape
        Dh, Vd = Z.shape[-1], Err.shape[-1]
        NH = N * H
        clipped = None
        if c is not None:  # where clipped, step = c / ||G||: its gradient flows into ||G||, none into theta
            clipped = theta * norm > c
            safe = torch.where(clipped, norm, torch.ones_like(norm))
            coef = torch.where(clipped, -step / safe.square(), torch.zeros_like(step))  # d step / d||G|| / ||G||
            coefc = _chunks(coef)
        ends = torch.tensor(last_chunk, device=Q.device).view(N, 1, 1, 1)
        # whole-sequence gradients, written block by block
        dQ, dK, dV = torch.empty_like(Q), torch.empty_like(K), torch.empty_like(dO)
        dA, dBv, dGamma = torch.empty_like(A), torch.empty_like(Bv), torch.empty_like(Gamma)
        dstep, dgh, dM = torch.empty_like(step), torch.empty_like(gh.squeeze(-1)), Q.new_empty(NC, N, H, 2, 2)
        # per-chunk views of whole-sequence tensors, batch and heads flattened: [N * H, ...]
        Kc, KcT, sc, gh3 = _chunks(K), _chunks(K.mT), _chunks(step.unsqueeze(-1)), _chunks(gh)
        AB = _chunks(torch.stack([A, Bv], dim=-1).unsqueeze(-1))  # [NH, C, 2, 1]
        dstepc, dghc, dMc = _chunks(dstep), _chunks(dgh), _chunks(dM)
        # a block's chunk-start states, recomputed from its checkpoint
        starts1 = check1.new_empty(block + 1, *check1.shape[1:])  # [block + 1, N, H, K, 2Dh]
        starts2 = check2.new_empty(block + 1, *check2.shape[1:])  # [block + 1, N, H, Dh, 2V]
        P1, P2 = _StateRing(starts1), _StateRing(starts2)
        a1c, a2c = _heads_flat(a1, N, H), _heads_flat(a2, N, H)  # the initial anchors [NH, R, S]
        # the gradients of the chunk-end states, and a second buffer each for the chunk-start ones
        G1 = _GradPair(torch.cat([dW1, dS1], -1).flatten(0, 1))  # [NH, K, 2Dh]
        G2 = _GradPair(torch.cat([dW2, dS2], -1).flatten(0, 1))  # [NH, Dh, 2V]
        spare1, spare2 = _GradPair(torch.empty_like(G1.flat)), _GradPair(torch.empty_like(G2.flat))
        if NC in last_chunk:
            G1.add_to_weight(ends == NC, dA1)
            G2.add_to_weight(ends == NC, dA2)
        sp1, sp2 = Q.new_empty(NH, C, 2, Dh), Q.new_empty(NH, C, 2, Vd)  # a chunk's [A dZq | B dZq], [A dO | B dO]
        sp1f, sp2f = sp1.view(NH, C, 2 * Dh), sp2.view(NH, C, 2 * Vd)
        # Blocks of chunks, last first: the block's per-token quantities, its chunk-start states (its
        # writes again, from its checkpoint) and its reads' backward at once, then the reverse loop
        # through its chunks; the block's temporaries stay in cache.
        for lo in reversed(range(0, NC, block)):
            hi = min(NC, lo + block)
            m, r = hi - lo, slice(lo, hi)
            (ae1, b1), (ae2, b2) = _mixing_rows(ae[r], b[r], Dh), _mixing_rows(ae[r], b[r], Vd)
            Hk, ap, app = act_derivatives(Z[r], activation)  # act, act', act'' at Z [m, N, H, C, Dh]
            Delta = D[r] * ap
            s = step[r].unsqueeze(-1)  # [m, N, H, C, 1]
            X1, X2 = s * Delta, s * Err[r]
            # each write's rows in W and S, [g X | h X]: [NH, C, 2Dh], [NH, C, 2V] per chunk
            spread1 = _chunks((X1.unsqueeze(-2) * gh[r]).flatten(-2))
            spread2 = _chunks((X2.unsqueeze(-2) * gh[r]).flatten(-2))
            Hc, HcT = _chunks(Hk), _chunks(Hk.mT)
            starts1[0], starts2[0] = check1[lo // block], check2[lo // block]
            for i in range(m - 1):
                P1.advance(i, ae1[i], b1[i], KcT[lo + i], spread1[i])
                P2.advance(i, ae2[i], b2[i], HcT[i], spread2[i])
            dQ[r], dKb, dA[r], dBv[r], dGamma[r], dX1r, dX2r, dHkr, Hq, dZq = _read_backward(
                dO[r], Q[r], K[r], starts1[:m], starts2[:m], A[r], Bv[r], Gamma[r], Zq[r], Hk, X1, X2, activation)
            dZ, dErr = torch.empty_like(Hk), torch.empty_like(X2)
            # per-chunk views of the block's tensors (chunk n is entry n - lo)
            Dc, Deltac, Ec, apc, appc = (_chunks(x) for x in (D[r], Delta, Err[r], ap, app))
            X1u, X2u = _chunks(X1.unsqueeze(-2)), _chunks(X2.unsqueeze(-2))
            dX1rc, dX2rc, dHkrc, dKc = _chunks(dX1r), _chunks(dX2r), _chunks(dHkr), _chunks(dKb)
            QcT, HqcT = _chunks(Q[r].mT), _chunks(Hq.mT)
            dZqu, dOu = _chunks(dZq.unsqueeze(-2)), _chunks(dO[r].unsqueeze(-2))
            dZc, dErrc = _chunks(dZ), _chunks(dErr)
            if c is not None:
                k2c, d2c, h2c, e2c = (_chunks(x.square().sum(-1, keepdim=True)) for x in (K[r], Delta, Hk, Err[r]))
            for n in reversed(range(lo, hi)):
                i = n - lo
                an1, an2 = (P1.weight[i], P2.weight[i]) if n > 0 else (a1c, a2c)
                wn, g1, g2 = gh3[n], G1.flat, G2.flat
                # the chunk's writes into its end states: P1 -= K^T [g X1 | h X1], P2 -= Hk^T [g X2 | h X2]
                KG = torch.bmm(Kc[n], g1).view(NH, C, 2, Dh)
                HG = torch.bmm(Hc[i], g2).view(NH, C, 2, Vd)
                dX1 = dX1rc[i] - (wn * KG).sum(-2)  # [NH, C, Dh]
                dX2 = dX2rc[i] - (wn * HG).sum(-2)  # [NH, C, V]
                dHk = torch.baddbmm(dHkrc[i], spread2[i], g2.mT, alpha=-1)
                dKc[i].baddbmm_(spread1[i], g1.mT, alpha=-1)
                torch.sub(-(KG * X1u[i]).sum(-1), (HG * X2u[i]).sum(-1), out=dghc[n])
                # X1 = step * Delta, X2 = step * Err
                dDelta, dE = sc[n] * dX1, sc[n] * dX2
                torch.add((dX1 * Deltac[i]).sum(-1), (dX2 * Ec[i]).sum(-1), out=dstepc[n])
                if c is not None:
                    rs = coefc[n].unsqueeze(-1) * dstepc[n].unsqueeze(-1)  # [NH, C, 1]
                    dDelta = dDelta + (rs * k2c[i]) * Deltac[i]
                    dE = dE + (rs * h2c[i]) * Ec[i]
                    dHk = dHk + (rs * e2c[i]) * Hc[i]
                    dKc[i].addcmul_(rs * d2c[i], Kc[n])
                # Delta = (Err a2^T) * act'(Z); Err = act(Z) a2 - target; Z = K a1
                dD = dDelta * apc[i]
                dE = torch.baddbmm(dE, dD, an2, out=dErrc[i])
                dZn = torch.mul(torch.baddbmm(dHk, dE, an2.mT), apc[i], out=dZc[i])
                dZn.addcmul_(dDelta * Dc[i], appc[i])
                # back to the chunk start: through the gates' mixing, the reads, and the anchor
                torch.add(_pair_products(g1, P1.flat[i]), _pair_products(g2, P2.flat[i]), out=dMc[n])
                ABdZq = torch.mul(dZqu[i], AB[n], out=sp1).view_as(sp1f)  # [A dZq | B dZq]
                ABdO = torch.mul(dOu[i], AB[n], out=sp2).view_as(sp2f)  # [A dO | B dO]
                G1.mix_transposed_into(spare1, ae1[i], b1[i]).flat.baddbmm_(QcT[i], ABdZq)
                G2.mix_transposed_into(spare2, ae2[i], b2[i]).flat.baddbmm_(HqcT[i], ABdO)
                G1, spare1, G2, spare2 = spare1, G1, spare2, G2
                # the anchor's gradients: da1 = K^T dZ [NH, K, Dh], da2 = dD^T Err + Hk^T dE [NH, Dh, V],
                # into the previous chunk's end weights (or, for the first chunk, the initial anchor's)
                if n > 0:
                    G1.weight.baddbmm_(KcT[n], dZn)
                    G2.weight.baddbmm_(dD.mT, Ec[i]).baddbmm_(HcT[i], dE)
                    if n in last_chunk:
                        G1.add_to_weight(ends == n, dA1)
                        G2.add_to_weight(ends == n, dA2)
            # the block's k and v: Z = K a1 (a1 the chunk-start W1; the initial anchor for chunk 0)
            if lo == 0:
                dKb[0] += dZ[0] @ a1.mT
            if hi > max(lo, 1):
                f = max(lo, 1)
                _mm_acc(dKb[f - lo:], dZ[f - lo:], starts1[f - lo:m, ..., :Dh].mT)
            if residual:
                dKb += dErr
            dK[r] = dKb
            torch.neg(dErr, out=dV[r])
        # chunk 0's anchor is the initial one: its gradients (dZn, dD, dE are chunk 0's)
        da1 = torch.bmm(KcT[0], dZn).view_as(dA1)
        da2 = torch.baddbmm(torch.bmm(dD.mT, Ec[0]), HcT[0], dE).view_as(dA2)
        if 0 in last_chunk:
            da1 = da1 + _where_rows(ends == 0, dA1)
            da2 = da2 + _where_rows(ends == 0, dA2)
        G1, G2 = G1.flat.unflatten(0, (N, H)), G2.flat.unflatten(0, (N, H))
        if residual:
            dQ += dO
        dtheta = dstep if clipped is None else torch.where(clipped, torch.zeros_like(dstep), dstep)
        dE_gate = torch.zeros_like(A)
        dA[..., -1] += dM[..., 0, 0]
        dBv[..., -1] += dM[..., 0, 1]
        dE_gate[..., -1] = dM[..., 1, 1]
        dGamma[..., -1, :] += dgh[..., 0]
        return (dQ, dK, dV, dtheta, dA, dBv, dE_gate, dGamma, dgh[..., 1], G1[..., :Dh], G1[..., Dh:],
                G2[..., :Vd], G2[..., Vd:], da1, da2, None, None, None, None, None)
