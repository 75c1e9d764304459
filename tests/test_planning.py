"""`moe-ray plan`: sizing from config.json or a published flavor, no weights present."""
from __future__ import annotations

import pytest

from moe_ray.checkpoint import open_checkpoint
from moe_ray.cli import main
from moe_ray.errors import SpecError
from moe_ray.planning import plan_model


@pytest.mark.parametrize("flavor, params_b, n_moe, experts, d_mid", [
    ("mixtral:8x7B", 46.7, 32, 8, 14336),       # Mixtral of Experts: 46.7B total parameters
    ("deepseek_moe:16B", 16.4, 27, 64, 1408),   # DeepSeekMoE 16B: 16.4B total parameters
    ("grok1:314B", 314, 64, 8, 32768),          # Grok-1: 314B parameters
])
def test_published_sizes(flavor, params_b, n_moe, experts, d_mid):
    plan = plan_model(flavor)
    assert plan.params / 1e9 == pytest.approx(params_b, rel=0.01)
    assert plan.nbytes == 2 * plan.params
    assert len(plan.facts.moe_layers) == n_moe and plan.facts.num_experts == experts
    assert plan.lap_bytes == d_mid * d_mid * 4
    assert plan.n_laps == n_moe * experts * (experts - 1) // 2
    assert sum(s.nbytes for s in plan.shards) == pytest.approx(plan.nbytes, rel=1e-6)
    assert all(s.nbytes <= 80 * 2**30 * 0.85 for s in plan.shards)
    covered = [l for s in plan.shards for l in range(s.first, s.last + 1)]
    assert covered == list(range(plan.facts.num_layers))


def test_gpu_and_node_counts():
    grok = plan_model("grok1:314B", gpus_per_node=8, gpu_mem_gib=80)
    # 588 GiB of bf16 weights at 68 GiB per GPU: 9 GPUs would hold 612 GiB, but whole layers
    # of 9.2 GiB (64 of them) pack 7 per GPU, so 10 GPUs, 2 nodes of 8
    assert grok.gpus == 10 and grok.nodes == 2
    assert plan_model("mixtral:8x7B").gpus == 2
    assert plan_model("deepseek_moe:16B").gpus == 1
    assert plan_model("grok1:314B", gpu_mem_gib=141).gpus == 6
    fits = plan_model("grok1:314B", nodes=1).fits()
    assert fits["dynamic"] == (False, "does not fit 1 node(s): needs 10 GPU(s) of 80 GiB at once: 2 node(s) of 8")
    assert fits["static"][0] and fits["reorder"][0]
    assert plan_model("grok1:314B", nodes=2).fits()["dynamic"][0]
    with pytest.raises(SpecError, match="--nodes must be at least 1, not -1"):
        plan_model("grok1:314B", nodes=-1)


def test_checkpoint_directory_matches_its_bytes(tiny):
    ckpt = tiny("deepseek_moe", "scratch")
    plan = plan_model(str(ckpt.path))
    assert plan.nbytes == open_checkpoint(ckpt.path).nbytes()   # tiny checkpoints are bf16
    assert plan.facts.moe_layers == (1, 2, 3)


def test_bad_model_names(capsys):
    with pytest.raises(SpecError, match="unknown mixtral flavor '9x9B'; known: 8x7B, 8x22B"):
        plan_model("mixtral:9x9B")
    assert main(["plan", "--model", "nowhere"]) == 2
    assert "moe-ray: error: nowhere is neither a checkpoint directory" in capsys.readouterr().err
    assert main(["plan", "--model", "mixtral:8x7B"]) == 0
    out = capsys.readouterr().out
    assert "46.7B parameters" in out and "896 LAPs" in out and "784.0 MiB cost matrix" in out


def test_plan_says_what_fits_where_without_torch():
    """`plan --nodes 1` for DeepSeek-V3: static and reorder fit one node, dynamic needs several; config
    arithmetic only, so the command imports neither torch nor Ray (a fresh interpreter's sys.modules)."""
    import json
    import subprocess
    import sys

    script = ("import io, json, sys, contextlib\n"
              "from moe_ray.cli import main\n"
              "out = io.StringIO()\n"
              "with contextlib.redirect_stdout(out):\n"
              "    rc = main(['plan', '--model', 'deepseek_v3:671B', '--nodes', '1'])\n"
              "print(json.dumps({'rc': rc, 'out': out.getvalue(), 'heavy': sorted(m for m in ('torch', 'ray', "
              "'transformers', 'safetensors') if m in sys.modules)}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    report = json.loads(done.stdout)
    assert report["rc"] == 0 and report["heavy"] == [], (report["heavy"], done.stderr)
    fit = report["out"].split("what fits where", 1)[1].splitlines()
    assert fit[0] == " (1 node(s) with 8 GPUs of 80 GiB):"
    assert fit[1].startswith("    static: fits one node: task by task on one 80 GiB GPU")
    assert fit[2].startswith("    reorder: fits one node: task by task on one 80 GiB GPU")
    assert fit[3].startswith("    dynamic: does not fit 1 node(s): needs ") and fit[3].endswith(" node(s) of 8")
