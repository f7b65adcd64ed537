"""Conditioners: prompts, labels and images -> the cond dict a denoiser reads."""
