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


# ---- what `moe-ray status` and `list` say about a job (no cluster needed) --------------------------

RAY_FAILED = ("Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\n"
              "moe-ray: planning: reading m's config\n"
              "moe-ray: error: layer 9 is not an MoE layer of m; MoE layers are 0..3 (4 layers)\n")


def test_failure_line_is_moe_rays_own_not_rays_wrapper():
    from moe_ray.service import JobStatus, failure_line

    assert failure_line(RAY_FAILED) == "layer 9 is not an MoE layer of m; MoE layers are 0..3 (4 layers)"
    assert failure_line("Job entrypoint command failed with exit code 1, last available logs:\nTraceback\n") == "Traceback"
    assert failure_line("Job was intentionally stopped.") == "Job was intentionally stopped."
    status = JobStatus("raysubmit_1", "FAILED", RAY_FAILED, "s.zarr", {"static": (1, 4)})
    assert status.line() == ("raysubmit_1: FAILED (static 1/4 units) - layer 9 is not an MoE layer of m; "
                             "MoE layers are 0..3 (4 layers)")


def test_status_counts_the_jobs_own_run_of_the_store(tmp_path):
    """A stopped job's store later finished by another run: its status keeps the counts its own run
    recorded and says the store was completed by another run, instead of the store's 4/4."""
    import zarr

    from moe_ray.service import own_progress
    from moe_ray.store import DONE

    url = str(tmp_path / "s.zarr")
    root = zarr.open_group(url, mode="w")
    root.create_array(f"static/{DONE}", shape=(4,), dtype="uint8", fill_value=0)[...] = [1, 1, 0, 0]
    root.attrs.update({"moe_ray": {}, "state": "running", "runs": [{"job": "raysubmit_a"}]})
    assert own_progress(url, "raysubmit_a") == ({"static": (2, 4)}, "")  # its run is the latest: live counts
    assert own_progress(url, "raysubmit_b") == ({}, "")  # not started yet
    root["static/" + DONE][...] = 1  # another run finishes the store
    root.attrs.update({"state": "complete", "runs": [
        {"job": "raysubmit_a", "state": "failed", "progress": {"static": [2, 4]}}, {"state": "complete"}]})
    assert own_progress(url, "raysubmit_a") == ({"static": (2, 4)}, "store complete (by another run)")
    assert own_progress(url, "raysubmit_b") == ({}, "store complete (by another run)")


def test_callback_opens_its_counter_with_the_first_total(capsys):
    from moe_ray.progress import Callback

    figures = Callback("report figures", "drawing task", enabled=True)
    for done in (1, 2, 3, 4):
        figures(done, 4, "static")
    figures.close()
    lines = capsys.readouterr().out.splitlines()
    assert [l.split(" (")[0] for l in lines] == [f"moe-ray: report figures: {d}/4 drawing task" for d in (1, 2, 3, 4)]
    quiet = Callback("report figures", enabled=False)
    quiet(1, 2)
    quiet.close()
    assert capsys.readouterr().out == ""
