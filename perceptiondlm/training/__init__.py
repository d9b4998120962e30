"""Training: YAML configs, model setup, the Trainer and the entry point of a training stage."""
