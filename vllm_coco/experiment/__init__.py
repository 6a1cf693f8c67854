"""The experiment (`coco-tools run`): config schema, stages, typed results, report."""
