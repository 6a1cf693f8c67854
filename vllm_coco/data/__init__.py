"""Inputs of the pipeline: contrast data (BBQ items, JSONL pairs, splits) and the demo model."""
