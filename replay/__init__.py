"""Replay of a scenario on real hardware with PyTorch (not yet built: see issue 6)."""
