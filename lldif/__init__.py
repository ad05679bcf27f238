"""LLDif: diffusion-guided facial expression recognition in extremely low light."""

__version__ = "0.1.0"
