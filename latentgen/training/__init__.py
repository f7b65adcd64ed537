"""Two-stage training of a latent diffusion pipeline: the codec on images, then the denoiser on latents."""
