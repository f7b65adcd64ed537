"""latentgen-minilm: a latentgen text conditioner on the frozen pretrained all-MiniLM-L6-v2 sentence encoder.

Importing this package imports nothing: latentgen builds `latentgen_minilm.conditioner.MiniLMConditioner`
through the entry point `minilm` of the group `latentgen.conditioners` when a config asks for it.
"""

__version__ = "0.1.0"
