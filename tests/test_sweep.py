"""sweep.py and sweep.sh: the table's aggregation over seeds and orderings, and the script end to end."""

import json
import os

import sweep


def test_table_aggregates_seeds_and_checks_orderings(tmp_path):
    def write(name, fname, obj):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / fname).write_text(json.dumps(obj))

    for seed in (0, 1, 2):
        for variant, top1 in (("m3ae", 50 + seed), ("mae", 40 + 2 * seed), ("text015", 55)):
            write(f"{variant}_s{seed}", "probe_builtin_fast.json", {"top1": top1, "knn_top1": top1 - 5})
            if variant != "text015":  # the colour probe's file is read into *_colour columns when it is there
                write(f"{variant}_s{seed}", "probe_builtin_colour_fast_paper.json", {"top1": top1 + 20, "knn_top1": top1 + 10})
            write(f"{variant}_s{seed}", "ood_builtin.json", {"scores": {s: {"auroc": 60.0 + seed} for s in
                                                                ("mahalanobis", "relative_mahalanobis", "msp")}})
        write(f"m3ae_s{seed}", "probe_builtin_fast_random_init.json", {"top1": 20, "knn_top1": 15})
    runs = sweep.main([str(tmp_path)])
    assert set(runs) == {"m3ae", "mae", "text015", "random"} and runs["random"][2]["top1"] == 20
    table = (tmp_path / "table.md").read_text()
    assert "| M3AE (text mask 0.75, 100% paired) | 3 | 51.0 ± 1.0 | 46.0 ± 1.0 | 71.0 ± 1.0 | 61.0 ± 1.0 | 61.0 ± 1.0 |" \
        in table
    assert "| M3AE, text mask 0.15 | 3 | 55.0 ± 0.0 | 50.0 ± 0.0 | - | - | 61.0 ± 1.0 |" in table
    assert "| 1. M3AE > MAE, linear probe, colour label | (ours: built-in data) | 71.0 ± 1.0 vs 62.0 ± 2.0 | yes | 3/3 |" \
        in table
    assert "| 1. M3AE > MAE, linear probe | 59.4 vs 45.2 | 51.0 ± 1.0 vs 42.0 ± 2.0 | yes | 3/3 |" in table
    assert "| 2. text mask 0.75 > 0.15, linear probe | 64.1 vs 53.3 | 51.0 ± 1.0 vs 55.0 ± 0.0 | **no** | 0/3 |" \
        in table
    assert "| 3. paired 10% > 0%, linear probe | 53.3 vs 45.2 | not run |" in table


def test_sweep_script_runs_jobs_in_parallel_and_writes_the_table(tmp_path):
    """sweep.sh end to end at toy sizes: two runs at a time (xargs), a log per run, the floors after the
    runs, the table last; and a failing run stops the sweep with its log's tail."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PY": sys.executable, "STEPS": "2", "SEEDS": "0", "VARIANTS": "m3ae mae", "JOBS": "2",
           "OUT": str(tmp_path / "sweep"), "TRAIN_ARGS": "--train-size 64 --batch-size 16 --warmup-steps 1",
           "EVAL_ARGS": "--train-size 40 --test-size 20 --epochs 2", "OOD_ARGS": "--ood-size 20"}
    env.pop("OMP_NUM_THREADS", None)
    res = subprocess.run(["bash", os.path.join(root, "sweep.sh")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"2 jobs x {max(1, len(os.sched_getaffinity(0)) // 2)} threads" in res.stdout
    done = [line.split()[2] for line in res.stdout.splitlines() if " done " in line]
    assert sorted(done[:2]) == ["m3ae_s0", "mae_s0"] and done[2] == "floor_s0"
    for name in ("m3ae_s0", "mae_s0", "floor_s0"):
        assert (tmp_path / "sweep" / "logs" / f"{name}.log").stat().st_size > 0
    table = (tmp_path / "sweep" / "table.md").read_text()
    assert "| M3AE (text mask 0.75, 100% paired) | 1 |" in table and "| random-init encoder (floor) | 1 |" in table
    for name in ("m3ae_s0/probe_builtin_colour_fast.json", "mae_s0/probe_builtin_colour_fast.json",
                 "m3ae_s0/probe_builtin_colour_fast_random_init.json"):  # both labels are probed, the floor included
        assert (tmp_path / "sweep" / name).exists(), name

    res = subprocess.run(["bash", os.path.join(root, "sweep.sh")], env={**env, "VARIANTS": "m3ae",
                         "TRAIN_ARGS": "--no-such-flag"}, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "FAILED: m3ae_s0" in res.stdout


def test_a_sweep_without_m3ae_has_its_floor_and_oods_empty_means_none(tmp_path):
    """VARIANTS=mae alone: the floor is evaluated beside the first variant (it read m3ae_s<seed>,
    absent, and the sweep failed); OODS="" runs no OOD (it fell back to the built-in one)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PY": sys.executable, "STEPS": "2", "SEEDS": "0", "VARIANTS": "mae",
           "OODS": "", "OUT": str(tmp_path / "sweep"),
           "TRAIN_ARGS": "--train-size 64 --batch-size 16 --warmup-steps 1",
           "EVAL_ARGS": "--train-size 40 --test-size 20 --epochs 2"}
    res = subprocess.run(["bash", os.path.join(root, "sweep.sh")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    table = (tmp_path / "sweep" / "table.md").read_text()
    assert "| random-init encoder (floor) | 1 |" in table
    assert not [f for f in os.listdir(tmp_path / "sweep" / "mae_s0") if f.startswith("ood")]
