"""Ray orchestration, knowing nothing of the analysis math:
- `cluster.py`:  connect to a cluster, join a local one, or start one with token auth on;
- `fanout.py`:   work units as Ray tasks with declared CPUs, GPUs and memory, bounded retries and a progress bar;
- `placement.py`: will the work fit the cluster's nodes (GPU memory included)?
- `pipeline.py`: layer-shard actors in a placement group, hidden states flowing actor to actor.
"""
