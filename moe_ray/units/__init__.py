"""Work units: what one unit of a job reads, computes (with `analysis/`) and writes (with `store`).

- `job.py`:     the `AnalysisJob` interface `api.run` drives (plan, prepare the store group, execute,
  finish);
- `static.py`:  one MoE layer's static analyses (S1, S2, S3, S5, S6), one Ray task per layer;
- `reorder.py`: batches of expert pairs of one layer, one task each, a done flag per pair (joint) or
  per pair and matrix (separate);
- `sizing.py`:  what a static or reorder unit takes (host and GPU memory), shared with `moe-ray plan`;
- `dynamic.py`: layer-shard actors running the forced all-expert capture over the inputs.
Units are plain functions or actors; `distributed/` runs them on Ray, on the device `job.py` resolves.
"""
