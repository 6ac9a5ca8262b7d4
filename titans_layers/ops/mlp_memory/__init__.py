"""MLP-memory op family (SPEC §1, ``f(x) = act(x @ W1) @ W2``, optionally ``+ x``)."""

from titans_layers.ops.mlp_memory.naive import naive_chunk_mlp_memory, naive_recurrent_mlp_memory
from titans_layers.ops.mlp_memory.state import MLPMemoryState

__all__ = ["MLPMemoryState", "naive_chunk_mlp_memory", "naive_recurrent_mlp_memory"]
