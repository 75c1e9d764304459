"""Ray orchestration, knowing nothing of the analysis math:
- `cluster.py`:  connect to a cluster, join a local one, or start one with token auth on;
- `fanout.py`:   work units as Ray tasks with declared memory, bounded retries and a progress bar;
- `pipeline.py`: layer-shard actors in a placement group, hidden states flowing actor to actor.
"""
