"""The shared core every stage imports: names and defaults (`names`), errors, number checks,
output paths and atomic writes, the neuron layout, and the two on-disk formats (the neuron
artifact and the NE directory). Nothing here imports a stage."""
