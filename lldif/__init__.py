"""LLDif: diffusion-guided facial expression recognition in extremely low light."""

__version__ = "0.1.0"

_MODEL_NAMES = ("LLDif", "LLDifConfig", "lldif_base", "lldif_tiny")


def __getattr__(name: str):
    # The model pulls in torch and the kernels; `import lldif` (the CLI, the data tools) stays light without it.
    if name == "LLDif":
        from .models.lldif import LLDif

        return LLDif
    if name in _MODEL_NAMES:
        from .models import config

        return getattr(config, name)
    raise AttributeError(f"module 'lldif' has no attribute {name!r}")
