"""PerceptionDLM: a masked-diffusion vision-language model that captions many image regions in parallel."""

from perceptiondlm.errors import PerceptionDLMError

__all__ = ["PerceptionDLMError"]
__version__ = "0.1.0"
