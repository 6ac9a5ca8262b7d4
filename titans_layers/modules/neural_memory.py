"""``NeuralMemory``: the Titans long-term memory as a layer with fla's interface."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from fla.layers.utils import get_layer_cache, repad_hidden_states, unpad_hidden_states, update_layer_cache

from titans_layers.modules.checks import (check_hidden_states, check_padding, flag, head_dim_for, positive_finite,
                                         positive_int, resolve_cache)
from titans_layers.modules.context_parallel import check_cp_call, memory_forward_cp
from titans_layers.modules.short_conv import ShortConvolution
from titans_layers.ops.common.clipping import check_max_update_norm
from titans_layers.ops import (chunk_mlp_memory, chunk_momentum_delta_rule, fused_recurrent_mlp_memory,
                               fused_recurrent_momentum_delta_rule, naive_chunk_mlp_memory,
                               naive_chunk_momentum_delta_rule)
from titans_layers.ops.common.triton_utils import MAX_HEAD_DIM
from titans_layers.ops.mlp_memory.naive import ACTIVATIONS, mlp_forward
from titans_layers.ops.momentum_delta_rule.chunk import KERNEL_CHUNK_SIZES

MEMORIES = ("linear", "mlp")
# memory -> (Triton chunkwise op, Triton decode op, PyTorch op)
OPS = {"linear": (chunk_momentum_delta_rule, fused_recurrent_momentum_delta_rule, naive_chunk_momentum_delta_rule),
       "mlp": (chunk_mlp_memory, fused_recurrent_mlp_memory, naive_chunk_mlp_memory)}
BACKENDS = ("auto", "triton", "torch")


def _inverse_sigmoid(p: float) -> float:
    return math.log(p / (1 - p))


class NeuralMemory(nn.Module):
    """Titans neural long-term memory layer (SPEC §2), a drop-in for fla's token mixers.

    Per token and head: ``q, k, v`` projections with an optional causal depthwise short
    convolution + SiLU, L2-normalised ``q`` and ``k``, and data-dependent gates
    ``alpha = sigmoid(.)`` (forget), ``eta = sigmoid(.)`` (momentum) and
    ``theta = max_step_size * sigmoid(.)`` (step size, bounded so the memory stays stable). The
    memory is written with the gated momentum-delta update and read with ``q`` (SPEC §1), starting
    from a learned initial memory per head; the read goes through an optional per-head RMSNorm and
    output gate, then ``o_proj``.

    Args:
        hidden_size: model width D.
        num_heads: H.
        memory: "linear" (``f(x) = x @ M``) or "mlp" (``f(x) = act(x @ W1) @ W2``, deep memory).
        head_dim: K = V per head (default ``hidden_size // num_heads``).
        chunk_size: tokens per chunk; gradients within a chunk are taken at its start weights.
        mlp_expansion: Dh = ``mlp_expansion * head_dim`` for the MLP memory.
        activation: "silu" or "gelu" (MLP memory).
        mlp_residual: MLP memory computes ``x + act(x @ W1) @ W2``.
        use_short_conv, conv_size: the short convolution on q, k, v and its width.
        max_step_size: upper bound of theta.
        max_update_norm: None (default) or a bound ``c`` on each token's write to the memory,
            ``||theta_t G_t||_F <= c`` (the step size is scaled down where the write would exceed
            it; :mod:`titans_layers.ops.common.clipping`). Off by default: it changes the update
            from the paper's (a Huber-type loss instead of the squared error), and with L2-normalised
            keys and ``theta <= max_step_size`` a linear memory already takes bounded steps. Turn it
            on for deep (MLP) memories, whose gradient is not bounded by the key norm, and for long
            streams of untrusted input: a run of high-norm tokens then moves the memory by at most
            ``c`` per token instead of by its error. Every op clips, the Triton kernels included.
        use_output_gate, use_output_norm, norm_eps: output gate (sigmoid), per-head RMSNorm.
        backend: "auto" (the Triton ops on CUDA when ``chunk_size`` is 16, 32 or 64 and the head dim
            is at most 128, the PyTorch ops otherwise), "triton" or "torch". Both give the same results.
        layer_idx: index of the layer in a model, for the cache.

    ``forward(hidden_states [B, T, D], attention_mask=None, past_key_values=None, use_cache=False,
    output_attentions=False, **kwargs) -> (o [B, T, D], None, past_key_values)``: a 2-D
    ``attention_mask`` [B, T_total] (0 = padding, 1 = token, left padding when decoding; its last T
    columns belong to this call) or ``cu_seqlens`` ``[N + 1]`` in kwargs (packed sequences, B = 1),
    not both; the memory state and the conv state live in fla's ``Cache``, one row per sequence. A
    call with a cache and ``use_cache=False`` continues from the cached state and leaves it untouched.

    Context parallelism: ``cp_context=`` (a :class:`~titans_layers.distributed.CPContext`) in kwargs
    with this rank's slice ``[1, n, D]`` of a packed batch, no mask, ``cu_seqlens`` or cache
    (:mod:`~titans_layers.modules.context_parallel`); ``cp_mode`` in kwargs, or the attribute
    ``cp_mode`` (default "auto"), picks how the memory state crosses ranks
    (:func:`~titans_layers.distributed.context_parallel_update`).
    """

    def __init__(self, hidden_size: int, num_heads: int, memory: str = "linear", head_dim: int | None = None,
                 chunk_size: int = 16, mlp_expansion: int = 2, activation: str = "silu", mlp_residual: bool = False,
                 use_short_conv: bool = True, conv_size: int = 4, max_step_size: float = 0.1,
                 max_update_norm: float | None = None, use_output_gate: bool = True, use_output_norm: bool = True,
                 norm_eps: float = 1e-5, backend: str = "auto", layer_idx: int | None = None):
        super().__init__()
        self.hidden_size = positive_int("hidden_size", hidden_size)
        self.num_heads = positive_int("num_heads", num_heads)
        if memory not in MEMORIES:
            raise ValueError(f"`memory` must be one of {MEMORIES}, got {memory!r}")
        self.head_dim = head_dim_for(hidden_size, num_heads, head_dim)
        self.chunk_size = positive_int("chunk_size", chunk_size)
        if activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {ACTIVATIONS}, got {activation!r}")
        max_step_size, norm_eps = positive_finite("max_step_size", max_step_size), positive_finite("norm_eps", norm_eps)
        for name, value in (("mlp_residual", mlp_residual), ("use_short_conv", use_short_conv),
                            ("use_output_gate", use_output_gate), ("use_output_norm", use_output_norm)):
            flag(name, value)
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
        self.kernels_fit = chunk_size in KERNEL_CHUNK_SIZES and self.head_dim <= MAX_HEAD_DIM
        if backend == "triton" and not self.kernels_fit:
            raise ValueError(f"`backend='triton'` needs `chunk_size` in {KERNEL_CHUNK_SIZES} and a head dim <= "
                             f"{MAX_HEAD_DIM}, got chunk_size = {chunk_size}, head_dim = {self.head_dim}")
        self.max_update_norm = check_max_update_norm(max_update_norm)
        self.memory, self.activation, self.mlp_residual = memory, activation, mlp_residual
        self.max_step_size, self.backend, self.layer_idx = max_step_size, backend, layer_idx
        self.cp_mode = "auto"  # how the memory state crosses ranks under cp_context (distributed.MODES)
        self.use_short_conv, self.use_output_gate, self.use_output_norm = use_short_conv, use_output_gate, \
            use_output_norm
        H, Dk = self.num_heads, self.head_dim
        inner = H * Dk
        self.q_proj = nn.Linear(hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(hidden_size, inner, bias=False)
        if use_short_conv:
            self.q_conv = ShortConvolution(inner, positive_int("conv_size", conv_size))
            self.k_conv = ShortConvolution(inner, conv_size)
            self.v_conv = ShortConvolution(inner, conv_size)
        # gates: forget ~ 0.01, momentum ~ 0.9, step ~ max_step_size / 2 at initialisation
        self.alpha_proj = nn.Linear(hidden_size, H)
        self.eta_proj = nn.Linear(hidden_size, H)
        self.theta_proj = nn.Linear(hidden_size, H)
        for proj, p in ((self.alpha_proj, 0.01), (self.eta_proj, 0.9), (self.theta_proj, 0.5)):
            nn.init.normal_(proj.weight, std=0.02)
            nn.init.constant_(proj.bias, _inverse_sigmoid(p))
        if memory == "linear":
            self.init_M = nn.Parameter(torch.zeros(1, H, Dk, Dk))  # [1, H, K, V] learned initial memory
        else:
            Dh = positive_int("mlp_expansion", mlp_expansion) * Dk
            self.init_W1 = nn.Parameter(torch.randn(1, H, Dk, Dh) / math.sqrt(Dk))  # [1, H, K, Dh]
            self.init_W2 = nn.Parameter(torch.randn(1, H, Dh, Dk) * 0.1 / math.sqrt(Dh))  # [1, H, Dh, V]
        if use_output_norm:
            self.o_norm = nn.RMSNorm(Dk, eps=norm_eps)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)

    def initial_state(self) -> tuple[torch.Tensor, ...]:
        """The learned initial memory, ``(M,)`` or ``(W1, W2)`` with a leading dim of 1."""
        return (self.init_M,) if self.memory == "linear" else (self.init_W1, self.init_W2)

    def _memory_op(self, device: torch.device, n_tokens: int):
        """The op for this call: Triton (chunkwise, or the decode kernel for a few tokens without
        gradients) on CUDA where the kernels apply, else the PyTorch dual form."""
        chunk, fused, torch_op = OPS[self.memory]
        if self.backend == "torch":
            return torch_op
        if self.backend == "auto" and (device.type != "cuda" or not self.kernels_fit):
            return torch_op
        if n_tokens <= 64 and not torch.is_grad_enabled():
            return fused
        return chunk

    def _check_hidden_states(self, hidden_states: torch.Tensor) -> None:
        check_hidden_states(hidden_states, self.hidden_size, self.q_proj.weight.dtype)

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reads ``o`` ``[..., H, V]`` of tokens ``x`` ``[..., D]`` -> ``[..., D]``: per-head norm,
        output gate, ``o_proj``."""
        if self.use_output_norm:
            o = self.o_norm(o)
        if self.use_output_gate:
            o = o * torch.sigmoid(self.g_proj(x)).unflatten(-1, (self.num_heads, self.head_dim))
        return self.o_proj(o.flatten(-2))

    def _project(self, x, proj, conv, conv_state, use_cache, cu_seqlens):
        y = proj(x)
        if not self.use_short_conv:
            return F.silu(y), None
        return conv(y, cache=conv_state, output_final_state=use_cache, cu_seqlens=cu_seqlens)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool | None = False, output_attentions: bool | None = False,
                **kwargs):
        past_key_values = resolve_cache(past_key_values, kwargs)
        cp_context = kwargs.pop("cp_context", None)
        if cp_context is not None:  # this rank's slice of a batch split across ranks
            cp = check_cp_call("NeuralMemory", cp_context, hidden_states, attention_mask, past_key_values, use_cache,
                               kwargs)
            return memory_forward_cp(self, hidden_states, cp, kwargs.pop("cp_mode", self.cp_mode)), None, None
        self._check_hidden_states(hidden_states)
        check_padding(hidden_states, attention_mask, kwargs.get("cu_seqlens"))
        B, T, _ = hidden_states.shape
        H, Dk = self.num_heads, self.head_dim
        last_state = get_layer_cache(self, past_key_values)
        x, indices, cu_seqlens = unpad_hidden_states(hidden_states, kwargs.get("cu_seqlens"), attention_mask, T)
        state = last_state["recurrent_state"] if last_state is not None else None
        if state is not None:
            rows, N = self.memory_weights(state)[0].shape[0], B if cu_seqlens is None else cu_seqlens.numel() - 1
            if rows != N:
                raise ValueError(f"the cached memory state has {rows} sequences, this call has {N}")

        conv_states = last_state["conv_state"] if last_state is not None and self.use_short_conv else (None,) * 3
        q, cq = self.query(x, conv_states[0], use_cache, cu_seqlens)  # [b, t, H, K]
        k, ck = self._project(x, self.k_proj, getattr(self, "k_conv", None), conv_states[1], use_cache, cu_seqlens)
        v, cv = self._project(x, self.v_proj, getattr(self, "v_conv", None), conv_states[2], use_cache, cu_seqlens)
        k = F.normalize(k.unflatten(-1, (H, Dk)), dim=-1)
        v = v.unflatten(-1, (H, Dk))  # [b, t, H, V]
        alpha = torch.sigmoid(self.alpha_proj(x).float())  # [b, t, H]
        eta = torch.sigmoid(self.eta_proj(x).float())
        theta = self.max_step_size * torch.sigmoid(self.theta_proj(x).float())

        if state is None:
            state = self.initial_state()
        op = self._memory_op(x.device, x.shape[1])
        extra = dict(activation=self.activation, residual=self.mlp_residual) if self.memory == "mlp" else {}
        if self.max_update_norm is not None:
            extra["max_update_norm"] = self.max_update_norm
        o, state = op(q, k, v, alpha.to(q.dtype), eta.to(q.dtype), theta.to(q.dtype), chunk_size=self.chunk_size,
                      initial_state=state, output_final_state=bool(use_cache), cu_seqlens=cu_seqlens, **extra)

        if use_cache:  # without it a given cache is read, never written
            update_layer_cache(self, past_key_values, recurrent_state=state,
                               conv_state=(cq, ck, cv) if self.use_short_conv else None, offset=T)
        o = repad_hidden_states(self._output(o, x), indices, B, T)
        return o, None, past_key_values

    # ---- read-only retrieval (MAC): the memory's query path without a write --------------------

    def query(self, hidden_states: torch.Tensor, conv_state: torch.Tensor | None = None,
              output_conv_state: bool = False, cu_seqlens: torch.Tensor | None = None):
        """The memory's queries for ``hidden_states``, without writing anything (MAC's retrieval).

        Same projection, short convolution (+ SiLU) and L2 normalisation as in :meth:`forward`. The
        convolution runs over ``hidden_states`` with its own cache, so a caller that feeds this path
        another stream than :meth:`forward` (MAC reads with the block input and writes the attention
        output) keeps the two convolution states apart.

        Args:
            hidden_states: ``[B, T, D]``, or ``[1, n, D]`` packed with ``cu_seqlens`` ``[N + 1]``.
            conv_state: the q convolution's cache ``[N, conv_size - 1, H * K]`` from a previous call,
                None at the start of the sequences.
            output_conv_state: also return the updated cache.

        Returns:
            ``(q [B, T, H, K], conv_state [N, conv_size - 1, H * K] or None)``.
        """
        self._check_hidden_states(hidden_states)
        q, cq = self._project(hidden_states, self.q_proj, getattr(self, "q_conv", None), conv_state,
                              output_conv_state, cu_seqlens)
        return F.normalize(q.unflatten(-1, (self.num_heads, self.head_dim)), dim=-1), cq  # [B, T, H, K]

    def query_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The memory's queries for tokens that are not a sequence (e.g. MAC's learned retrieval
        queries): the q projection, SiLU and L2 normalisation of :meth:`query`, without the short
        convolution (a set of tokens has no neighbours to mix in, and the convolution's cache
        belongs to a stream). Without a convolution the layer's own queries take exactly this path.

        Args:
            tokens: ``[..., D]``.

        Returns:
            ``[..., H, K]``, unit norm per head.
        """
        if tokens.shape[-1] != self.hidden_size:
            raise ValueError(f"`tokens` must have shape [..., {self.hidden_size}], got {list(tokens.shape)}")
        q = F.silu(self.q_proj(tokens))  # [..., H * K]
        return F.normalize(q.unflatten(-1, (self.num_heads, self.head_dim)), dim=-1)  # [..., H, K]

    def memory_weights(self, state=None) -> tuple[torch.Tensor, ...]:
        """The memory weights as they stand in ``state``: ``(M,)`` ``[N or 1, H, K, V]`` for the linear
        memory, ``(W1, W2)`` ``[N or 1, H, K, Dh]``, ``[N or 1, H, Dh, V]`` for the MLP memory.

        ``state`` is None (the learned initial memory, leading dim 1), a state NamedTuple from the ops
        (its current weights, not the chunk anchor) or a tuple ``(M, ...)`` / ``(W1, W2, ...)``."""
        if state is None:
            return self.initial_state()
        if hasattr(state, "M"):
            return (state.M,)
        if hasattr(state, "W1"):
            return (state.W1, state.W2)
        if isinstance(state, (tuple, list)) and len(state) >= (1 if self.memory == "linear" else 2):
            return (state[0],) if self.memory == "linear" else (state[0], state[1])
        raise TypeError(f"`state` must be None, a memory state or a tuple of weights, got {type(state).__name__}")

    def retrieve(self, q: torch.Tensor, hidden_states: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Read ``f(q; W)`` with fixed weights (no write) and map it to the model width through the
        layer's output path (per-head norm, output gate, ``o_proj``), as :meth:`forward` does with
        its reads.

        Args:
            q: ``[N, L, H, K]`` queries from :meth:`query`.
            hidden_states: ``[N, L, D]``, the tokens the queries came from (for the output gate).
            weights: from :meth:`memory_weights`, leading dim N or 1.

        Returns:
            ``[N, L, D]`` in ``q``'s dtype.
        """
        N, L, H, K = q.shape
        if (H, K) != (self.num_heads, self.head_dim) or hidden_states.shape != (N, L, self.hidden_size):
            raise ValueError(f"`q` must be [N, L, {self.num_heads}, {self.head_dim}] and `hidden_states` "
                             f"[N, L, {self.hidden_size}], got {list(q.shape)} and {list(hidden_states.shape)}")
        qh = q.transpose(1, 2).to(weights[0].dtype)  # [N, H, L, K]
        if self.memory == "linear":
            o = qh @ weights[0]  # [N, H, L, V]
        else:
            o = mlp_forward(qh, weights[0], weights[1], self.activation, self.mlp_residual)  # [N, H, L, V]
        return self._output(o.transpose(1, 2).to(q.dtype), hidden_states)  # [N, L, D]
