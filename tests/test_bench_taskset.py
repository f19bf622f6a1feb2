"""benchmarks/bench_taskset.py at a tiny size: the slides it writes are slides, and it reports a row
per format (no timing is checked: speed is the benchmark's to measure, not the tests')."""

import subprocess
import sys

import numpy as np
import openslide

from envs.slides import is_slide, tissue_mask

SCRIPT = "benchmarks/bench_taskset.py"


def test_slide_benchmark_runs_and_keeps_its_slides(repo_root, tmp_path):
    command = [sys.executable, SCRIPT, "--formats", "slide-svs", "procedural", "--image-side"]
    command += ["2048", "--num-images", "3", "--num-test-images", "1", "--regions-per-slide", "2"]
    command += ["--targets-per-image", "2", "--view-size", "16", "--write-workers", "1"]
    command += ["--workdir", str(tmp_path)]
    run = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    rows = {line.split("|")[1].strip(): line.split("|") for line in run.stdout.splitlines()[-2:]}
    # 2 training slides + 1 held out, 2 regions x 2 targets each; procedural: 2 targets per image
    assert rows["slide-svs"][3].strip() == "12" and rows["procedural"][3].strip() == "6"
    assert "wrote slide 3/3" in run.stderr
    slides = sorted((tmp_path / "slide-svs").iterdir())
    assert [path.name for path in slides] == [f"slide00{i}_side2048_seed0.svs" for i in range(3)]
    with openslide.OpenSlide(str(slides[0])) as slide:
        assert slide.properties["openslide.vendor"] == "aperio" and is_slide(slides[0])
        assert slide.level_dimensions == ((2048, 2048), (512, 512))  # down to under 1,024
        assert float(slide.properties["openslide.mpp-x"]) == 0.5
        thumbnail = np.asarray(slide.read_region((0, 0), 1, (512, 512)).convert("RGB"))
    assert 0.1 < tissue_mask(thumbnail)[0].mean() < 0.6  # islands of tissue on glass
    # A second run keeps the slides already written.
    again = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "wrote slide" not in again.stderr
