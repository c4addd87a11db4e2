"""Evaluation: metrics, spliced-model fidelity, reports and plots."""
