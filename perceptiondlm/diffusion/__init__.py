"""Masked diffusion: the LLaDA forward (noising) process and its training loss."""
