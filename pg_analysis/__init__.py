"""Platonic Grounding toolkit — analysis half.

Layer-wise vision–language alignment (``pg-align``), feature extraction and the offline assets.
See docs/architecture.md for the map of modules.
"""

__version__ = "0.1.0"
