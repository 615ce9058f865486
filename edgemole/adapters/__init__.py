"""Adapter methods in PEFT's tuner layout: one folder per method with config, layer and model."""
