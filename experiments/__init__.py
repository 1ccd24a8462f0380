"""Experiment harness: configs, TU data, the GIN backbone with a pooling chosen by name, training, tables."""
