"""Causal depthwise short convolution in PyTorch: packed sequences, a decode cache, any device."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from titans_layers.modules.checks import check_cu_seqlens, check_hidden_states, positive_int


def sequence_starts(cu_seqlens: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed tokens ``[n_tokens]``: the sequence each belongs to and its position in it."""
    seq = torch.searchsorted(cu_seqlens[1:], torch.arange(n_tokens, device=cu_seqlens.device), right=True)
    pos = torch.arange(n_tokens, device=cu_seqlens.device) - cu_seqlens[seq]
    return seq, pos


class ShortConvolution(nn.Module):
    """Causal depthwise 1-D convolution over time followed by SiLU, as in fla's layers.

    ``forward(x [1, T, D] packed or [B, T, D], cache=None, output_final_state=False,
    cu_seqlens=None) -> (y [same shape], cache [N, kernel_size - 1, D] or None)``: each sequence
    (a row, or a ``cu_seqlens`` segment) sees only its own past, or the ``cache`` of its last
    ``kernel_size - 1`` inputs from a previous call. ``cu_seqlens`` ``[N + 1]``: integer offsets
    from 0 to T, never decreasing, with B = 1. ``cp_context``: x is this rank's slice ``[1, n, D]``
    of a batch split across ranks (:class:`~titans_layers.distributed.CPContext`); the first
    sequence's last ``kernel_size - 1`` inputs before the slice come from the preceding ranks, and
    their gradients go back.
    """

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = False, activation: bool = True):
        super().__init__()
        positive_int("channels", channels)
        positive_int("kernel_size", kernel_size)
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))  # [D, W], tap W-1 is the current token
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, output_final_state: bool = False,
                cu_seqlens: torch.Tensor | None = None, cp_context=None):
        check_hidden_states(x, self.channels, self.weight.dtype, name="x")
        B, T, D = x.shape
        W = self.kernel_size
        if cp_context is not None:  # this rank's slice: the first sequence's history is on the preceding ranks
            from titans_layers.distributed import check_context, left_halo
            from titans_layers.modules.context_parallel import conv_cache
            if cache is not None or cu_seqlens is not None:
                raise ValueError("ShortConvolution under `cp_context` takes neither `cache` nor `cu_seqlens` "
                                 "(the context holds the sequences and the history comes from the preceding ranks)")
            cp = check_context(cp_context)
            cp.check_local("x", x)
            cu_seqlens = cp.cu_seqlens.to(x.device)
            cache = conv_cache(left_halo(x, cp, W - 1), cu_seqlens.numel() - 1, W - 1)
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, x)
        else:
            cu_seqlens = torch.arange(0, (B + 1) * T, T, device=x.device)
        N = cu_seqlens.numel() - 1
        flat = x.reshape(B * T, D)
        if cache is None:
            cache = x.new_zeros(N, W - 1, D)
        elif cache.shape != (N, W - 1, D):
            raise ValueError(f"`cache` must have shape [N, kernel_size - 1, D] = [{N}, {W - 1}, {D}], "
                             f"got {list(cache.shape)}")
        # one buffer holding the tokens, then every sequence's cached history
        src = torch.cat([flat, cache.reshape(N * (W - 1), D).to(flat.dtype)], dim=0)  # [B*T + N*(W-1), D]
        seq, pos = sequence_starts(cu_seqlens, B * T)
        lag = torch.arange(W - 1, -1, -1, device=x.device)  # tap j looks back W-1-j tokens
        rel = pos[:, None] - lag[None, :]  # [B*T, W] position of the input within its sequence
        from_cache = B * T + seq[:, None] * (W - 1) + (W - 1 + rel).clamp(min=0)
        idx = torch.where(rel >= 0, torch.arange(B * T, device=x.device)[:, None] - lag[None, :], from_cache)
        y = (src[idx] * self.weight.t().to(flat.dtype)[None]).sum(1)  # [B*T, D]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.activation:
            y = F.silu(y)
        new_cache = None
        if output_final_state:
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # [N]
            back = torch.arange(W - 1, 0, -1, device=x.device)  # the last W-1 positions
            rel_end = lengths[:, None] - back[None, :]  # [N, W-1]
            tok = cu_seqlens[:-1, None] + rel_end
            hist = B * T + torch.arange(N, device=x.device)[:, None] * (W - 1) + (W - 1 + rel_end).clamp(min=0)
            new_cache = src[torch.where(rel_end >= 0, tok, hist)]  # [N, W-1, D]
        return y.reshape(B, T, D), new_cache
