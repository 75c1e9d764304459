"""Work units: what one unit of a job reads, computes (with `analysis/`) and writes (with `store`).

- `static.py`: one MoE layer's static analyses (S1, S2, S3, S5, S6).
Units are plain functions; `distributed/` runs them as Ray tasks.
"""
