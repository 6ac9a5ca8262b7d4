"""Hugging Face-compatible Titans models (MAC, MAG, MAL, LMM, hybrid stacks)."""
