"""MLP-memory op family (SPEC §1, ``f(x) = act(x @ W1) @ W2``, optionally ``+ x``)."""

from titans_layers.ops.mlp_memory.chunk import chunk_mlp_memory
from titans_layers.ops.mlp_memory.fused_recurrent import fused_recurrent_mlp_memory
from titans_layers.ops.mlp_memory.naive import naive_chunk_mlp_memory, naive_recurrent_mlp_memory
from titans_layers.ops.mlp_memory.state import MLPMemoryState

__all__ = ["MLPMemoryState", "chunk_mlp_memory", "fused_recurrent_mlp_memory", "naive_chunk_mlp_memory",
           "naive_recurrent_mlp_memory"]
