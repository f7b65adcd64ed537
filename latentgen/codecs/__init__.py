"""First-stage codecs: images <-> latents."""
