"""The memory-update ops under context parallelism: :func:`context_parallel_update`.

Each rank holds a contiguous slice of one packed batch (``CPContext``) and calls an ordinary op of
:mod:`titans_layers.ops` (reference or kernel, unchanged) on it; what differs is where the state of
a sequence that crosses a slice edge comes from. Three modes:

- ``"parallel"`` (linear memory, the default there): state passing in parallel. For the sequence
  crossing its right edge each rank computes the affine map of its slice,
  ``x_end = T x_start + c`` with ``x = [M; S; anchor]`` ``[3K, V]`` per head (``T`` ``[3K, 3K]``
  acts on the key side: the update is ``M' = a M + b S - K^T diag(g theta) (K anchor - V)`` column
  by column, so the V columns never mix), from a zero state and the chunk phase at its left edge.
  It gets ``T`` and ``c`` in one call of the op itself over that sequence's tokens with the value
  columns widened to ``[V | I_K basis of M | of S | of anchor]`` (values 0 there), so the chunk
  closed form, the partial chunks and the anchor are those of the op, in float32. One all-gather
  of ``(T, c)``; each rank folds the maps of the ranks before it into its initial state
  (``x <- T_j x + c_j``) and runs the op. Backward: each rank takes the gradient of its initial
  state through its own outputs ``d_r``; one all-gather of ``d``; the gradient of a rank's final
  state is ``g_{r+1} = d_{r+1} + T_{r+1}^T g_{r+2}`` over the ranks the sequence spans; then the
  op's ordinary backward runs with it. Communication per rank per call, independent of T:
  ``R * H * (9 K^2 + 3 K V)`` floats received in the forward, ``R * H * 3 K V`` in the backward.
  Not for ``max_update_norm`` (clipping makes the map non-affine): use ``"sequential"``.
- ``"sequential"`` (any memory; the default for the MLP memory and for clipping): the state
  passes from rank to rank (:func:`~titans_layers.distributed.sequential.sequential_stage`); it
  serialises the memory op across the ranks.
- ``"heads"`` (any memory, H divisible by R): all-to-all from sequence shards to head shards, the
  op over the whole sequence for H / R heads, all-to-all back
  (:mod:`~titans_layers.distributed.heads`).
"""

from __future__ import annotations

import torch

from titans_layers.distributed.comm import all_gather_stack
from titans_layers.distributed.context import CPContext, check_context
from titans_layers.distributed.families import LINEAR, Family, family_of, global_rows
from titans_layers.distributed.graph import any_requires_grad, detached_leaves, grad_of
from titans_layers.distributed.sequential import sequential_stage
from titans_layers.ops.common.validation import check_chunk_size

MODES = ("auto", "parallel", "sequential", "heads")
N_INPUTS = 6


def _check_inputs(cp: CPContext, q, k, v, alpha, eta, theta) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), ("alpha", alpha), ("eta", eta), ("theta", theta)):
        cp.check_local(name, x)


def _local_call(op, family: Family, cp: CPContext, inputs, fields, offsets, C: int, kwargs):
    """The op over this rank's slice with one state row per local sequence; returns
    ``(o [1, n, H, V], final weights in field order [n_seq, H, ...], final offsets [n_seq])``."""
    state = family.make_state(fields, offsets, C)
    o, final = op(*inputs, chunk_size=C, initial_state=state, output_final_state=True,
                  cu_seqlens=cp.cu_seqlens.to(inputs[0].device), **kwargs)
    return o, family.split_state(final), final.offset


def _with_row0(fields, row0):
    """Replace the first row of every field by ``row0`` (``[1, H, ...]`` each)."""
    if row0 is None:
        return list(fields)
    return [torch.cat([r.to(f.dtype), f[1:]]) for r, f in zip(row0, fields)]


# ---- linear memory: state passing in parallel ------------------------------------------------

def _stack_basis(x: torch.Tensor, n_p: int) -> torch.Tensor:
    """``[1, t, H, ...]`` -> ``[1, t, H * n_p, ...]``, each head repeated n_p times (adjacent)."""
    return x.unsqueeze(3).expand(*x.shape[:3], n_p, *x.shape[3:]).flatten(2, 3)


def slice_map(op, cp: CPContext, inputs, fields, offsets: list[int], phase0: int, C: int, kwargs):
    """The affine map of this slice for the sequence crossing its right edge (no gradient).

    Returns ``(T [H, 3K, 3K], c [H, 3K, V])``, with ``x = [M; S; anchor]`` stacked along K:
    ``x_end = T x_start + c``. ``T`` is zero unless that sequence also crosses the left edge
    (otherwise its state at the right edge does not depend on earlier ranks and ``c`` is that
    state); both are zero when no sequence crosses the right edge.
    """
    q, k, v, alpha, eta, theta = inputs
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    dtype = fields[0].dtype
    T = torch.zeros(H, 3 * K, 3 * K, dtype=dtype, device=q.device)
    c = torch.zeros(H, 3 * K, V, dtype=dtype, device=q.device)
    if not cp.continues_right:
        return T, c
    p = int(cp.cu_seqlens[-2])  # local start of the last sequence
    spanning = cp.continues_left and p == 0
    kk, vv, a, e, th = (x[:, p:] for x in (k, v, alpha, eta, theta))
    t = kk.shape[1]
    if not spanning:  # the last sequence starts here: its own initial state, no dependence on earlier ranks
        init = [f[-1:] for f in fields]
        state = LINEAR.make_state(init, torch.tensor([offsets[-1]], device=q.device), C)
        _, final = op(kk, kk, vv, a, e, th, chunk_size=C, initial_state=state, output_final_state=True, **kwargs)
        c = torch.cat([final.M[0], final.S[0], final.anchor[0]], dim=1)  # [H, 3K, V]
        return T, c
    # widen the value columns: [V real | K basis of M | K of S | K of anchor | padding], in pieces of V
    width = V + 3 * K
    n_p = -(-width // V)
    pad = n_p * V - width
    v_aug = torch.cat([vv, vv.new_zeros(1, t, H, 3 * K + pad)], dim=-1)  # [1, t, H, n_p V]
    eye = torch.eye(K, dtype=dtype, device=q.device).expand(1, H, K, K)  # [1, H, K, K]
    zero = torch.zeros_like(eye)
    zv = torch.zeros(1, H, K, V, dtype=dtype, device=q.device)  # the real columns start from zero
    zpad = torch.zeros(1, H, K, pad, dtype=dtype, device=q.device)
    M0 = torch.cat([zv, eye, zero, zero, zpad], dim=-1)  # [1, H, K, n_p V]
    S0 = torch.cat([zv, zero, eye, zero, zpad], dim=-1)
    W0 = torch.cat([zv, zero, zero, eye, zpad], dim=-1)

    def heads(s):  # [1, H, K, n_p V] -> [1, H n_p, K, V]
        return s.unflatten(-1, (n_p, V)).movedim(3, 2).flatten(1, 2)

    def unheads(s):  # [1, H n_p, K, V] -> [H, K, n_p V]
        return s.unflatten(1, (H, n_p)).movedim(2, 3).flatten(3, 4)[0]

    state = LINEAR.make_state([heads(M0), heads(S0), heads(W0)],
                              torch.tensor([phase0], device=q.device), C)
    k_aug = _stack_basis(kk, n_p)
    _, final = op(k_aug, k_aug, v_aug.unflatten(-1, (n_p, V)).flatten(2, 3), _stack_basis(a, n_p),
                  _stack_basis(e, n_p), _stack_basis(th, n_p), chunk_size=C, initial_state=state,
                  output_final_state=True, **kwargs)
    ends = [unheads(final.M), unheads(final.S), unheads(final.anchor)]  # [H, K, n_p V] each
    c = torch.cat([x[..., :V] for x in ends], dim=1)  # [H, 3K, V]
    T = torch.cat([x[..., V:V + 3 * K] for x in ends], dim=1)  # [H, 3K, 3K]
    return T, c


class _LinearParallel(torch.autograd.Function):
    @staticmethod
    def forward(fctx, spec, *tensors):
        cp: CPContext = spec["cp"]
        op, C, kwargs = spec["op"], spec["C"], spec["kwargs"]
        inputs, fields = list(tensors[:N_INPUTS]), list(tensors[N_INPUTS:])
        H, K, V = inputs[0].shape[2], inputs[0].shape[3], inputs[2].shape[3]
        R = cp.world_size
        with torch.no_grad():
            T, c = slice_map(op, cp, inputs, fields, spec["offsets"], spec["phase0"], C, kwargs)
            gathered = all_gather_stack(torch.cat([T.flatten(), c.flatten()]), cp.group)  # [R, H (9K^2 + 3KV)]
            Ts = gathered[:, :T.numel()].view(R, H, 3 * K, 3 * K)
            cs = gathered[:, T.numel():].view(R, H, 3 * K, V)
            x = None
            if cp.continues_left:  # fold the maps of the ranks this sequence spans before us
                x = cs[cp.first_rank]
                for j in range(cp.first_rank + 1, cp.rank):
                    x = Ts[j] @ x + cs[j]
        needs = spec["needs_grad"]
        leaves = detached_leaves(tensors) if needs else list(tensors)
        x_leaf = None
        if x is not None:
            x_leaf = x.clone().requires_grad_(needs)
        with torch.set_grad_enabled(needs):
            row0 = None if x_leaf is None else [x_leaf[:, i * K:(i + 1) * K].unsqueeze(0) for i in range(3)]
            o, final, final_offset = _local_call(op, LINEAR, cp, leaves[:N_INPUTS], _with_row0(leaves[N_INPUTS:], row0),
                                                 spec["local_offsets"], C, kwargs)
        spec["final_offset"] = final_offset
        fctx.spec, fctx.K, fctx.Ts = spec, K, Ts
        if needs:
            fctx.graph = ([o] + final, leaves, x_leaf)
        return (o.detach(), *(f.detach() for f in final))

    @staticmethod
    def backward(fctx, do, *dfinal):
        spec, K, Ts = fctx.spec, fctx.K, fctx.Ts
        cp: CPContext = spec["cp"]
        outputs, leaves, x_leaf = fctx.graph
        del fctx.graph
        grads_out = [do] + list(dfinal)
        H, V = Ts.shape[1], outputs[0].shape[-1]
        # d_r: the gradient of this rank's initial state through its own outputs (and final states)
        if x_leaf is not None:
            d = grad_of(outputs, [x_leaf], grads_out, retain_graph=True)[0]
        else:
            d = torch.zeros(H, 3 * K, V, dtype=Ts.dtype, device=Ts.device)
        ds = all_gather_stack(d.contiguous(), cp.group)  # [R, H, 3K, V]
        if cp.continues_right:  # the gradient of the state at our right edge, from the ranks after us
            g = ds[cp.last_rank]
            for j in range(cp.last_rank - 1, cp.rank, -1):
                g = Ts[j].transpose(-1, -2) @ g + ds[j]
            grads_out = list(grads_out)
            for i in range(3):
                gi = torch.zeros_like(outputs[1 + i]) if grads_out[1 + i] is None else grads_out[1 + i].clone()
                gi[-1] += g[:, i * K:(i + 1) * K].to(gi.dtype)
                grads_out[1 + i] = gi
        got = grad_of(outputs, leaves, grads_out, retain_graph=False)
        return (None, *got)


# ---- the entry point ---------------------------------------------------------------------------

def context_parallel_update(op, q, k, v, alpha, eta, theta, *, cp_context: CPContext, mode: str = "auto",
                            chunk_size: int = 16, initial_state=None, output_final_state: bool = False,
                            **op_kwargs):
    """A memory-update op of :mod:`titans_layers.ops` over a packed batch split across ranks.

    Args:
        op: the op to run on each slice, e.g. ``naive_chunk_momentum_delta_rule`` or
            ``chunk_mlp_memory`` (references and kernels alike; it is called unchanged).
        q, k: ``[1, n, H, K]``; v: ``[1, n, H, V]``; alpha, eta, theta: ``[1, n, H]``: this rank's
            slice (``n = cp_context.local_length`` tokens, global positions ``start:end``).
        cp_context: from :func:`~titans_layers.distributed.build_cp_context` (global sequences).
        mode: "auto" (linear memory without clipping: "parallel"; otherwise "sequential"),
            "parallel" (linear memory only), "sequential" or "heads" (H divisible by R); see the
            module docstring.
        chunk_size: as for the op; chunks start at each global sequence's first token.
        initial_state: as for the op, for the N *global* sequences (rows ``[N or 1, ...]``).
        output_final_state: also return the state of each local sequence after its last token in
            this slice (the true final state for the sequences that end here; the state at the
            right edge for a sequence that goes on). With ``mode="heads"`` every row is the state
            after the sequence's last token in the whole batch.
        op_kwargs: the op's other options (``activation``, ``residual``, ``max_update_norm``);
            not ``cu_seqlens`` (the context holds the sequences).

    Returns:
        ``(o [1, n, H, V], final_state or None)``, ``final_state`` with one row per local
        sequence (``cp_context.seq_ids``). Equal to one process running ``op`` on the whole batch.
    """
    cp = check_context(cp_context)
    family = family_of(op)
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    if "cu_seqlens" in op_kwargs:
        raise ValueError("under context parallelism the sequences come from `cp_context` (built from the global "
                         "cu_seqlens); do not pass `cu_seqlens`")
    _check_inputs(cp, q, k, v, alpha, eta, theta)
    C = check_chunk_size(chunk_size)
    clip = op_kwargs.get("max_update_norm") is not None
    if mode == "auto":
        mode = "parallel" if family is LINEAR and not clip else "sequential"
    if mode == "parallel" and (family is not LINEAR or clip):
        raise ValueError("mode='parallel' (affine state passing) needs the linear memory without "
                         "`max_update_norm`; use mode='sequential' or 'heads'")
    if mode == "heads":
        from titans_layers.distributed.heads import head_parallel_update
        return head_parallel_update(op, family, cp, (q, k, v, alpha, eta, theta), C, initial_state,
                                    output_final_state, op_kwargs)

    fields, offsets = global_rows(family, initial_state, q, v, len(cp.global_cu_seqlens) - 1, C)
    ids = torch.tensor(cp.seq_ids, device=q.device)
    fields = [f[ids] for f in fields]  # [n_seq, H, ...] the local sequences' initial rows
    offsets_host = offsets[ids].tolist()
    phase0 = (offsets_host[0] + cp.left_offset) % C if cp.continues_left else offsets_host[0]
    local_offsets = torch.tensor([phase0] + offsets_host[1:], dtype=torch.long, device=q.device)
    inputs = (q, k, v, alpha, eta, theta)
    tensors = (*inputs, *fields)
    spec = dict(cp=cp, op=op, C=C, kwargs=op_kwargs, offsets=offsets_host, phase0=phase0,
                local_offsets=local_offsets, needs_grad=any_requires_grad(tensors))
    if mode == "parallel":
        o, *final = _LinearParallel.apply(spec, *tensors)
    else:
        n_in = len(inputs)

        def run(incoming, *ts):
            o_, final_, off_ = _local_call(op, family, cp, ts[:n_in], _with_row0(ts[n_in:], incoming),
                                           local_offsets, C, op_kwargs)
            spec["final_offset"] = off_
            return [o_] + final_, [f[-1:] for f in final_]

        templates = [f[:1].detach() for f in fields]
        o, *final = sequential_stage(run, cp, templates, *tensors)
    if not output_final_state:
        return o, None
    return o, family.make_state(list(final), spec["final_offset"], C)
