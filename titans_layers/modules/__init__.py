"""Layers with fla's layer interface (NeuralMemory, PersistentMemory, SlidingWindowAttention, gates)."""
