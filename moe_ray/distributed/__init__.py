"""Ray orchestration: connecting to a cluster (`cluster.py`) and fanning work units out as tasks
with declared resources, retries and progress (`fanout.py`). Knows nothing of the analysis math."""
