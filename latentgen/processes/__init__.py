"""Diffusion processes (latentgen.contracts.process): `discrete` (DDPM's family, Stable Diffusion's), `edm`
(Karras et al. 2022) and `rectified_flow` (Stable Diffusion 3's)."""
