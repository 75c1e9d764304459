"""Pure analysis math: tensors in, tensors out. Nothing here knows about Ray, Zarr or checkpoints.

- `static.py`:  S1 matrix similarity, S2 matrix PCA (+ DBSCAN), S3 neuron averaging, S5 neuron PCA,
  S6 gate-embedding similarity and its correlation with W_gate (paper §4.1.1, §4.2, App A–C);
- `reorder.py`: S4 neuron reordering as an exact linear assignment, Kendall's tau (§4.1.2, Tab 2);
- `assignment.py` (+ `assignment_cpu.py`, its numba kernels): the exact assignment solver S4 uses, a
  sparse solve certified on the dense matrix by dual variables (lapjv the reference and fallback);
- `dynamic.py`: D1–D5 on captured expert outputs: per-token cosine, angular mean, norms vs router
  scores and their rank counts, activation ratios, top-k (paper §5, App D, App E);
- `summary.py`: the one-number-per-model summaries of the paper's tables (Tab 2's relative growth, its
  median and order of magnitude), numpy only so the report can import them without torch.
"""
