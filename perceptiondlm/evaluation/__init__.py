"""Benchmarks: the region-captioning runner (ParaDLC-Bench, DLC-Bench), judges, the published scoring protocol
and the VLMEvalKit adapter for PerceptionDLM-Base. See `evaluation/README.md` for the commands."""
