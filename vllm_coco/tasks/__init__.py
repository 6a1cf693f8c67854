"""Evaluate: the lm-eval task logic, `coco-tools eval` runs and comparisons of runs."""
