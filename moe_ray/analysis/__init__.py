"""Pure analysis math: tensors in, tensors out. Nothing here knows about Ray, Zarr or checkpoints.

- `static.py`: S1 matrix similarity, S2 matrix PCA (+ DBSCAN), S3 neuron averaging, S5 neuron PCA,
  S6 gate-embedding similarity and its correlation with W_gate (paper §4, App A–C).
"""
