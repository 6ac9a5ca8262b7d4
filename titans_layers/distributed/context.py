"""The context-parallel context: which contiguous slice of one packed sequence batch this rank holds.

Context parallelism splits one packed batch (B = 1, ``cu_seqlens``, sequences of any lengths) into
equal contiguous token slices, one per rank of a process group. A sequence may start and end
anywhere: inside a slice, on a slice boundary, or span several slices. :func:`build_cp_context`
reads the global ``cu_seqlens`` (the same on every rank) and describes this rank's slice; the ops,
layers and models take it as ``cp_context=`` together with the rank's local slice of their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, eq=False)
class CPContext:
    """This rank's slice of a packed batch under context parallelism (frozen: build one per step;
    compared by identity).

    Fields:

    - ``group``: the process group the slices are spread over (None = the default group).
    - ``rank``, ``world_size``: this rank's index in ``group`` and the group's size R.
    - ``total_length``: T, the packed length of the global batch; every slice holds ``T / R`` tokens.
    - ``start``, ``end``: this rank's tokens are the global positions ``start:end``.
    - ``global_cu_seqlens``: the global sequence offsets ``[N + 1]`` as a tuple of ints.
    - ``starts``, ``ends``: ``(start, end)`` of every rank, tuples of length R.
    - ``cu_seqlens``: ``[n + 1]`` int32 local offsets of the ``n`` sequences that have tokens in this
      slice (pieces of sequences cut at the slice edges), on the device given to the builder.
    - ``seq_ids``: the global index of each local sequence, a tuple of length n.
    - ``continues_left``: the first local sequence began on an earlier rank (it crosses the left edge).
    - ``continues_right``: the last local sequence goes on to the next rank (it crosses the right edge).
    - ``left_offset``: tokens of the first local sequence before ``start`` (0 unless ``continues_left``).
    - ``first_rank``: the rank on which the first local sequence began (``rank`` unless it continues).
    - ``last_rank``: the rank on which the last local sequence ends (``rank`` unless it continues).
    """

    group: object
    rank: int
    world_size: int
    total_length: int
    start: int
    end: int
    global_cu_seqlens: tuple
    starts: tuple
    ends: tuple
    cu_seqlens: torch.Tensor
    seq_ids: tuple
    continues_left: bool
    continues_right: bool
    left_offset: int
    first_rank: int
    last_rank: int

    @property
    def local_length(self) -> int:
        """Tokens in this slice, ``end - start``."""
        return self.end - self.start

    @property
    def num_local_sequences(self) -> int:
        return len(self.seq_ids)

    def crossing_left(self, rank: int) -> bool:
        """Whether ``rank``'s first local sequence began on an earlier rank (no communication)."""
        return _crosses(self.global_cu_seqlens, self.starts[rank]) and rank > 0

    def crossing_right(self, rank: int) -> bool:
        """Whether ``rank``'s last local sequence goes on to the next rank."""
        return rank < self.world_size - 1 and _crosses(self.global_cu_seqlens, self.ends[rank])

    def sequence_start(self, seq_id: int) -> int:
        """Global position of sequence ``seq_id``'s first token."""
        return self.global_cu_seqlens[seq_id]

    def check_local(self, name: str, x: torch.Tensor, dim: int = 1) -> None:
        """Raise unless ``x`` holds this rank's slice along ``dim`` (B = 1 packed input)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"`{name}` must be a tensor, got {type(x).__name__}")
        if x.shape[0] != 1:
            raise ValueError(f"context parallelism packs sequences into one row: `{name}` must have B = 1, "
                             f"got shape {list(x.shape)}")
        if x.shape[dim] != self.local_length:
            raise ValueError(f"`{name}` must hold this rank's slice of {self.local_length} tokens "
                             f"(global positions {self.start}:{self.end}) along dim {dim}, got shape {list(x.shape)}")


def _crosses(cu: tuple, position: int) -> bool:
    """A sequence runs through ``position`` (it is not a sequence boundary) and position is inside."""
    return 0 < position < cu[-1] and position not in cu


def _check_cu_seqlens(cu_seqlens) -> tuple:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.dtype.is_floating_point \
            or cu_seqlens.dtype == torch.bool:
        raise TypeError("`cu_seqlens` must be a 1-D integer tensor of global sequence offsets [N + 1], got "
                        f"{cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__}"
                        f"{' of shape ' + str(list(cu_seqlens.shape)) if isinstance(cu_seqlens, torch.Tensor) else ''}")
    cu = tuple(int(c) for c in cu_seqlens.tolist())
    if len(cu) < 2 or cu[0] != 0:
        raise ValueError(f"`cu_seqlens` must start at 0 and hold at least one sequence, got {list(cu)}")
    if any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"`cu_seqlens` must never decrease, got {list(cu)}")
    return cu


def _group_size_rank(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("build_cp_context needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group)")
    try:
        return dist.get_world_size(group), dist.get_rank(group)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"`group` is not a process group this rank belongs to: {err}") from err


def build_cp_context(cu_seqlens: torch.Tensor, group=None, device=None, check: bool = True) -> CPContext:
    """Describe this rank's slice of a packed batch split over ``group``.

    Args:
        cu_seqlens: ``[N + 1]`` integer global sequence offsets of the packed batch (B = 1), the same
            on every rank: from 0 to the packed length T, never decreasing.
        group: the process group (None: the default group). R = its size must divide T.
        device: where the local ``cu_seqlens`` goes (default: ``cu_seqlens``'s device).
        check: compare ``cu_seqlens`` across the ranks (one small all-gather) and raise if they differ.

    Returns:
        a :class:`CPContext`: this rank holds global positions ``start:end = rank * T / R : (rank + 1) * T / R``.

    Raises:
        TypeError / ValueError: ``cu_seqlens`` malformed, T not divisible by R (or T = 0), no process
        group, or the ranks gave different ``cu_seqlens`` (with ``check``).
    """
    cu = _check_cu_seqlens(cu_seqlens)
    R, rank = _group_size_rank(group)
    T = cu[-1]
    if T == 0 or T % R:
        raise ValueError(f"context parallelism splits the packed length equally: T = {T} must be a positive "
                         f"multiple of the group size {R}; pad the batch (e.g. with a short dummy sequence)")
    if check:
        _check_same_everywhere(cu, group, R)
    n = T // R
    starts = tuple(r * n for r in range(R))
    ends = tuple((r + 1) * n for r in range(R))
    start, end = starts[rank], ends[rank]
    # local sequences: those with a token in [start, end)
    ids = [i for i in range(len(cu) - 1) if cu[i] < end and cu[i + 1] > start]
    local = [start] + [cu[i] for i in ids[1:]] + [end]
    device = cu_seqlens.device if device is None else device
    local_cu = torch.tensor([p - start for p in local], dtype=torch.int32, device=device)
    left = rank > 0 and _crosses(cu, start)
    right = rank < R - 1 and _crosses(cu, end)
    first_seq_start = cu[ids[0]]
    last_seq_end = cu[ids[-1] + 1]
    return CPContext(group=group, rank=rank, world_size=R, total_length=T, start=start, end=end,
                     global_cu_seqlens=cu, starts=starts, ends=ends, cu_seqlens=local_cu, seq_ids=tuple(ids),
                     continues_left=left, continues_right=right, left_offset=start - first_seq_start if left else 0,
                     first_rank=first_seq_start // n if left else rank,
                     last_rank=min((last_seq_end - 1) // n, R - 1) if right else rank)


def _check_same_everywhere(cu: tuple, group, R: int) -> None:
    mine = torch.tensor([len(cu)] + list(cu), dtype=torch.long)
    size = torch.tensor([mine.numel()], dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(R)]
    dist.all_gather(sizes, size, group=group)
    width = int(max(s.item() for s in sizes))
    padded = torch.nn.functional.pad(mine, (0, width - mine.numel()), value=-1)
    everyone = [torch.zeros_like(padded) for _ in range(R)]
    dist.all_gather(everyone, padded, group=group)
    if any(not torch.equal(e, padded) for e in everyone):
        raise ValueError("`cu_seqlens` must be the global offsets, the same on every rank of `group`; the ranks "
                         "gave different ones (pass the whole batch's cu_seqlens, not the local slice's)")


def check_context(cp_context, group_hint: str = "cp_context") -> CPContext:
    """Raise a TypeError unless ``cp_context`` is a :class:`CPContext` built by :func:`build_cp_context`;
    a ValueError if this process is no longer at the rank the context was built for."""
    if not isinstance(cp_context, CPContext):
        raise TypeError(f"`{group_hint}` must be a CPContext from titans_layers.distributed.build_cp_context, "
                        f"got {type(cp_context).__name__}")
    if not dist.is_initialized():
        raise ValueError(f"`{group_hint}` needs the torch.distributed process group it was built with")
    R, rank = dist.get_world_size(cp_context.group), dist.get_rank(cp_context.group)
    if (R, rank) != (cp_context.world_size, cp_context.rank):
        raise ValueError(f"`{group_hint}` was built for rank {cp_context.rank} of {cp_context.world_size}, "
                         f"but this process is rank {rank} of {R} in its group")
    return cp_context
