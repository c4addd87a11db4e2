"""Hydra YAML config groups (installed as ``sae_conf``): sae/, train/, data/, model/."""
