"""Tokenizers and text encoders used by the text conditioners."""
