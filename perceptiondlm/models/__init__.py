"""Model definitions: the LLaDA backbone and (later) the PerceptionDLM vision-language model."""
