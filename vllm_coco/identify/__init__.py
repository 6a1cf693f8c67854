"""Identify: capture intensities -> COCO score -> selection -> the neuron artifact (and its report)."""
