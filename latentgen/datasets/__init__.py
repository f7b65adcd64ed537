"""Embedded datasets that need no download: procedural shapes and scikit-learn digits."""
