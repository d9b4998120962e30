"""Inputs for the models: tokenizer special tokens, chat template, tiling, masks, processor."""
