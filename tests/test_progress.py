"""moe_ray.progress: plain lines where no terminal is attached, silent with progress off."""
from __future__ import annotations

from moe_ray.progress import Counter, ShardCounters, step


def test_plain_counter_prints_a_line_per_ten_percent_and_the_end(capsys):
    with Counter(1000, "dynamic shard 0", "token", terminal=False) as bar:
        for _ in range(1000):
            bar.update()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10  # 10%, 20%, ..., 90%, then the closing 1000/1000
    assert lines[0].startswith("moe-ray: dynamic shard 0: 100/1000 token (10%, ")
    assert lines[-1].startswith("moe-ray: dynamic shard 0: 1000/1000 token (100%, ")
    assert all(line.strip() and "\r" not in line for line in lines)


def test_jumps_print_one_line_and_a_note_is_its_own_line(capsys):
    bar = Counter(4, "static units", terminal=False)
    bar.update(3)  # 75%: one line, not seven
    bar.note("static units: a GPU torch cannot see")
    bar.update(1)
    bar.close()
    bar.close()  # closing twice says nothing more
    lines = capsys.readouterr().out.splitlines()
    assert [l.split(" (")[0] for l in lines] == ["moe-ray: static units: 3/4 unit",
                                                 "moe-ray: static units: a GPU torch cannot see",
                                                 "moe-ray: static units: 4/4 unit"]


def test_progress_off_is_silent(capsys):
    step("connecting", enabled=False)
    shards = ShardCounters(["shard 0", "shard 1"], {"short": 8, "long": 1100}, "token", enabled=False)
    for shard in (0, 1):
        shards(shard, "short")
        shards(shard, "long")
    shards.close()
    assert capsys.readouterr().out == ""


def test_shard_counters_count_each_shards_tokens(capsys):
    shards = ShardCounters(["shard 0", "shard 1"], {"short": 8, "long": 92}, "token")
    shards(0, "long")
    shards(0, "short")
    shards(1, "long")
    assert [c.done for c in shards.counters] == [100, 92]
    shards.close()
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("moe-ray: shard 0: 100/100 token") and out[-1].startswith("moe-ray: shard 1: 92/100 token")
