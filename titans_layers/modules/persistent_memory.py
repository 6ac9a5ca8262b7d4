"""``PersistentMemory``: learned, data-independent tokens for a block's attention."""

from __future__ import annotations

import torch
import torch.nn as nn

from titans_layers.modules.checks import positive_finite, positive_int


class PersistentMemory(nn.Module):
    """N_p learned tokens ``[N_p, D]`` (the paper's persistent memory: task knowledge that does
    not depend on the input).

    Two ways to use them:

    - as attention prefix: ``prefix()`` ``[1, N_p, D]`` goes to
      :class:`~titans_layers.modules.SlidingWindowAttention` as ``prefix_states``, visible to every
      position whatever the window (what the Titans blocks do);
    - as tokens: ``prepend(x)`` ``[B, T, D] -> [B, N_p + T, D]`` and ``strip(y)`` drops them again.

    Writing them into a neural memory needs no work at run time: the memory's state after reading
    N_p fixed tokens does not depend on the data, so it is folded into the memory's learned
    initial state (``NeuralMemory.init_*``), which learns the same thing.
    """

    def __init__(self, num_tokens: int, hidden_size: int, init_std: float = 0.02):
        super().__init__()
        positive_int("num_tokens", num_tokens)
        positive_int("hidden_size", hidden_size)
        init_std = positive_finite("init_std", init_std)
        self.num_tokens = num_tokens
        self.tokens = nn.Parameter(torch.randn(num_tokens, hidden_size) * init_std)  # [N_p, D]

    def prefix(self) -> torch.Tensor:
        """``[1, N_p, D]``: the tokens as ``prefix_states`` shared by every sequence."""
        return self.tokens.unsqueeze(0)

    def prepend(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, D] -> [B, N_p + T, D]``."""
        if x.ndim != 3 or x.shape[-1] != self.tokens.shape[-1]:
            raise ValueError(f"`x` must have shape [B, T, {self.tokens.shape[-1]}], got {list(x.shape)}")
        return torch.cat([self.tokens.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)

    def strip(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, N_p + T, D] -> [B, T, D]``: drop the persistent positions from a block output."""
        if y.ndim != 3 or y.shape[1] < self.num_tokens:
            raise ValueError(f"`y` must have shape [B, N_p + T, D] with N_p = {self.num_tokens}, got {list(y.shape)}")
        return y[:, self.num_tokens:]
