"""`make demo` (`python -m moe_ray.demo`), the one command a new user runs first: every model built, every
analysis run, the report written, with the planted truths visible in what it stored (the upcycled experts are
alike and like their dense parent, the independent ones are not)."""
from __future__ import annotations

import numpy as np

import moe_ray
from moe_ray import demo
from moe_ray.store import store_status


def test_the_demo_runs_every_model_and_writes_the_report(ray_session, tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Done. Report: {out / 'report' / 'index.html'}" in printed
    stores = {name: out / f"{name}.zarr" for name in demo.MODELS}
    for name, store in stores.items():
        assert {a: s["state"] for a, s in store_status(str(store)).items()} == \
            {a: "complete" for a in store_status(str(store))}, name
    index = (out / "report" / "index.html").read_text()
    assert "Comparison across models" in index and "Findings" in index
    assert len(list((out / "report").rglob("*.png"))) >= 90

    def mean_similarity(store, expert_j: str | None = None) -> float:
        sim = moe_ray.open_results(str(store))["static"]["matrix_similarity"]
        routed = [i for i, label in enumerate(sim["expert_i_label"].values) if str(label).isdigit()]
        values = sim.isel(expert_i=routed)
        if expert_j is None:
            values = values.isel(expert_j=routed).values
            off = ~np.eye(len(routed), dtype=bool)
            return float(np.nanmean(values[..., off]))
        return float(np.nanmean(values.sel(expert_j_label=expert_j).values))

    assert mean_similarity(stores["results"]) > 0.7  # upcycled: copies of one dense parent, plus noise
    assert mean_similarity(stores["results"], "F") > 0.8  # ... and alike their parent
    assert abs(mean_similarity(stores["results-scratch"])) < 0.05  # independent experts
