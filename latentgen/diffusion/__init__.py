"""The diffusion process: noise schedules, eps/v/x0 preconditioning, classifier-free guidance."""
