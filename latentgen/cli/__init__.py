"""Command-line apps: latentgen, latentgen-train, latentgen-sample."""
