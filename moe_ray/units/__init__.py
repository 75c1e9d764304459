"""Work units: what one unit of a job reads, computes (with `analysis/`) and writes (with `store`).

- `job.py`:     the `AnalysisJob` interface `api.run` drives (plan, prepare the store group, execute,
  finish);
- `static.py`:  one MoE layer's static analyses (S1, S2, S3, S5, S6), one Ray task per layer;
- `reorder.py`: one expert pair of one layer (joint) or one pair and matrix (separate), one task each;
- `dynamic.py`: layer-shard actors running the forced all-expert capture over the inputs.
Units are plain functions or actors; `distributed/` runs them on Ray.
"""
