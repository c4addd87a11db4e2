"""Uses of trained latents: steering a model with them and attributing its outputs to them.

Downstream of models and harvest, upstream of nothing (eval's report may call it). Entry points:
``sae-steer`` and ``sae-attribute``.
"""
