"""benchmarks/gpu_check.sh waits for a GPU that comes only now and then: its dry run on CPU
(--device cpu --quick: tiny shapes everywhere, no compile) keeps every step of it working meanwhile.
One dry run (~1 min on 2 cores), then its summary.json, check.log and logs.tar.gz are read: the
figures must be there, not only the exit code."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile

import pytest


def load(repo_root, name):
    spec = importlib.util.spec_from_file_location(name, repo_root / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check(repo_root):
    return load(repo_root, "gpu_check")


@pytest.fixture(scope="module")
def dry_run(repo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--quick"],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    summary = (
        json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    )
    return result, out, summary


def test_dry_run_passes_and_writes_its_three_files(dry_run):
    result, out, summary = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["check.log", "logs.tar.gz", "summary.json"]
    assert summary["ok"] is True and summary["problems"] == []
    assert summary["check"]["device"] == "cpu" and summary["check"]["quick"] is True
    assert set(summary) == {
        "issue",
        "ok",
        "problems",
        "cut_short",
        "check",
        "environment",
        "tests",
        "bench",
        "user_command",
        "probe",
        "bench_compile",
        "bench_ratios",
    }
    check_log = (out / "check.log").read_text()
    assert "GPU: none; torch " in check_log  # the versions are printed
    assert "wheelhouse: " in check_log


def test_dry_run_records_the_environment_and_the_skipped_cuda_tests(dry_run, repo_root):
    _, _, summary = dry_run
    environment = summary["environment"]
    assert environment["gpu"] is None and environment["torch"] and environment["numpy"]
    assert environment["packages"]["procgen-mirror"] and environment["probe_default_updates"] > 0
    tests = summary["tests"]
    assert tests["status"] == "ok" and tests["passed"] == tests["failed"] == tests["errors"] == 0
    # every CUDA test was collected by `-m cuda` and skipped here, none ran
    assert tests["skipped"] >= (repo_root / "tests" / "test_cuda_paths.py").read_text().count(
        "\ndef test_"
    )


def test_dry_run_measures_each_bench_config(dry_run, gpu_check):
    _, _, summary = dry_run
    configs = summary["bench"]["configs"]
    assert summary["bench"]["status"] == "ok"
    assert list(configs) == list(gpu_check.PLANS["quick"].bench_configs)
    for figures in configs.values():
        assert (
            figures["sps"] > 0 and figures["update_over_bound"] > 0 and figures["peak_rss_gb"] > 0
        )
        assert abs(sum(figures["sections"].values()) - 1) < 0.01
    assert list(summary["bench_ratios"]) == ["procgen/paper-nochannelslast / procgen/paper"]
    assert summary["bench_compile"]["status"] == "skipped"


def test_dry_run_stops_the_users_command_with_ctrl_c_after_it_logged(dry_run):
    _, _, summary = dry_run
    user = summary["user_command"]
    assert user["command"].startswith(
        "python ppo_procgen_mdr.py --env-id bigfish --norm bn --alpha1 2 --alpha2 1 --cuda"
    )
    assert "--no-pretrained" in user["command"]
    # our Ctrl-C, a clean stop
    assert user["exit_codes"] == [130] and user["stopped"] and user["status"] == "ok"
    assert user["started_after_seconds"] is not None
    assert user["iterations_logged"] >= 1 and user["global_step"] > 0 and user["sps_last"] > 0


def test_dry_run_rates_the_probe_alone_and_side_by_side(dry_run, gpu_check):
    _, _, summary = dry_run
    probe = summary["probe"]
    phases = probe["phases"]
    assert [phase["concurrent"] for phase in phases] == list(gpu_check.PLANS["quick"].side_by_side)
    for phase in phases:
        assert phase["status"] == "ok"
        # --total-timesteps 32 of 2 envs x 8 steps
        assert phase["updates"] == [2] * phase["concurrent"]
        assert phase["seconds_per_update"] > 0 and phase["runs_per_hour"] > 0
        # a full run = the overhead + the default number of updates at the measured pace
        expected = (
            phase["overhead_seconds"] + probe["default_updates"] * phase["seconds_per_update"]
        )
        assert phase["run_seconds_at_default"] == pytest.approx(expected, rel=0.05, abs=1)
    assert probe["best_runs_per_hour"] == max(phase["runs_per_hour"] for phase in phases)


def test_dry_run_archives_every_log_and_run(dry_run):
    _, out, summary = dry_run
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    logs = [
        log
        for record in (summary["tests"], summary["bench"], summary["user_command"])
        for log in record["logs"]
    ]
    logs += [log for phase in summary["probe"]["phases"] for log in phase["logs"]]
    for log in logs + ["logs/environment.log", "bench.json", "tests.xml"]:
        assert f"gpu_check/{log}" in names
    assert any(
        name.startswith("gpu_check/user_command/runs/") and "events.out.tfevents" in name
        for name in names
    )
    assert sum(name.endswith("metrics.csv") for name in names) == sum(
        phase["concurrent"] for phase in summary["probe"]["phases"]
    )
    assert not any(name.endswith(".pt") for name in names)  # checkpoints stay out


def test_full_plan_fits_eight_minutes_and_names_known_configs(gpu_check, repo_root):
    full = gpu_check.PLANS["full"]
    bench = load(repo_root, "bench_sps")
    assert set(full.bench_configs + full.compile_configs) <= set(bench.CONFIGS)
    assert full.budget <= 8 * 60
    user = full.user_startup + full.user_seconds + full.user_grace
    steps = (
        full.test_seconds + full.bench_seconds + user + full.probe_seconds * len(full.side_by_side)
    )
    # what is left goes to the compile benchmark
    assert steps + gpu_check.FINAL_SECONDS < full.budget
    header = (repo_root / "ppo_procgen_mdr.py").read_text()
    # still the user's command
    assert f"# Run:   python {' '.join(gpu_check.USER_COMMAND)}\n" in header


def test_bench_sps_rejects_a_bad_shape_in_one_line(repo_root):
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_sps.py", "--shape", "4,16"],
        cwd=repo_root,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "--shape: '4,16': give ENVS,STEPS,MINIBATCH, e.g. 4,16,32" in result.stderr
    assert "Traceback" not in result.stderr
