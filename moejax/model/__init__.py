"""Flax NNX MoE decoder (resident reference) and its building blocks."""
