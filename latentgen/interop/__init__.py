"""Reading and writing other projects' checkpoint formats (original Stable Diffusion single files)."""
