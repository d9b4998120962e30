"""PerceptionDLM: a masked-diffusion vision-language model that captions many image regions in parallel."""

from perceptiondlm.errors import PerceptionDLMError

__all__ = ["PerceptionDLM", "PerceptionDLMError", "PerceptionDLMProcessor"]
__version__ = "0.1.0"

_LAZY = {
    "PerceptionDLM": "perceptiondlm.models.perceptiondlm",
    "PerceptionDLMProcessor": "perceptiondlm.processing.processor",
}


def __getattr__(name: str):
    # The model classes import torch and transformers; load them on first use so `import perceptiondlm`
    # (and the CLI's start-up) stays fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'perceptiondlm' has no attribute {name!r}")
