"""Pieces shared by every op family: input checks, sequence layout, gate products, Triton helpers."""
