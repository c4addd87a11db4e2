"""Harvest stage: model loading, text -> packed contexts, hook points, and the harvester.

``model`` loads a Hugging Face model (packaged, hub or local folder); ``text`` and ``corpus``
turn a dataset into numbered contexts; ``hookpoints`` maps friendly names to modules; the
``harvester`` runs the forward (stopping after the deepest hook) and yields activation rows with
their token ids and positions. ``sae.buffer`` stores them (``fill``) or streams them (``live``).
"""
