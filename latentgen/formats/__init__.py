"""Checkpoint formats (kind `format`): latentgen's own file and the original Stable Diffusion single file,
registered like a plugin's, and `dispatch`, which picks the format that reads a file."""
