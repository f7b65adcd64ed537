"""Denoising networks trained in latent space."""
