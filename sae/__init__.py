"""sae-forge: sparse autoencoders and transcoders for Hugging Face model activations.

Stages: harvest -> buffer -> train -> eval -> export. See README.md for the map.
"""

__version__ = "0.1.0"
