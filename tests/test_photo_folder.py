"""sweeps/make_photo_folder.py (issue 26): the Stage C photo folder holds the listed photographs,
unchanged, with the manifest's hashes; the committed docs/collapse/study_c/photos.json is what the
installed packages give, so a rerun of the study uses its images; bad input is one line and writes
nothing; and the folder builds the probe's task sets as the Stage C photo list asks for them."""

import hashlib
import importlib.util
import json
import shlex
from pathlib import Path

import pytest
import tyro

import envs
import ppo_collapse_probe as probe

REPO = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location(
    "make_photo_folder", REPO / "sweeps" / "make_photo_folder.py"
)
photos = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(photos)

STUDY_C = REPO / "docs" / "collapse" / "study_c"
COMMITTED_MANIFEST = STUDY_C / "photos.json"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def committed_photos() -> list:
    return json.loads(COMMITTED_MANIFEST.read_text())["photos"]


def assert_one_line_error(exit_code, capsys, *fragments):
    """What the user sees: a non-zero exit, one line 'error: ...' on stderr, nothing on stdout."""
    captured = capsys.readouterr()
    assert exit_code != 0
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    for fragment in fragments:
        assert fragment in captured.err, captured.err


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The Stage C folder as PLAN.md makes it (data/photos, checked against the committed
    manifest), written once into a temporary folder."""
    dest = tmp_path_factory.mktemp("checkout") / "data" / "photos"
    assert photos.main([str(dest), "--check", str(COMMITTED_MANIFEST)]) == 0
    return dest


def test_the_folder_holds_the_listed_photographs_with_the_manifests_hashes(folder):
    manifest = json.loads((folder / "photos.json").read_text())
    names = [photo["file"] for photo in manifest["photos"]]
    assert names == [f"{package}-{file}" for package, _, file in photos.PHOTOS]
    assert sorted(path.name for path in folder.iterdir()) == sorted(names + ["photos.json"])
    for photo in manifest["photos"]:
        assert sha256(folder / photo["file"]) == photo["sha256"], photo["file"]
    # copied unchanged from the packages' files
    for name, source, _ in photos.source_files():
        assert (folder / name).read_bytes() == source.read_bytes(), name
    assert manifest["source"] == "sweeps/make_photo_folder.py"


def test_the_committed_manifest_is_what_the_installed_packages_give():
    installed = [(name, sha256(path)) for name, path, _ in photos.source_files()]
    assert [(photo["file"], photo["sha256"]) for photo in committed_photos()] == installed
    # the same files inside the packages (the versions may move on as long as the bytes do not)
    origins = [origin.split(": ", 1)[1] for _, _, origin in photos.source_files()]
    assert [photo["from"].split(": ", 1)[1] for photo in committed_photos()] == origins


def test_an_earlier_copy_is_written_again_in_place(folder, tmp_path, capsys):
    again = tmp_path / "photos"
    again.mkdir()
    for path in folder.iterdir():
        (again / path.name).write_bytes(path.read_bytes())
    stale = again / f"{photos.PHOTOS[0][0]}-{photos.PHOTOS[0][2]}"
    stale.write_bytes(b"stale")
    assert photos.main([str(again), "--check", str(COMMITTED_MANIFEST)]) == 0
    assert "wrote 10 photographs to" in capsys.readouterr().out
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in folder.iterdir())
    for path in folder.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("mismatch", ["hash", "missing", "extra"])
def test_check_against_a_mismatching_manifest_is_one_line_and_writes_nothing(
    mismatch, tmp_path, capsys
):
    manifest = {"source": "sweeps/make_photo_folder.py", "photos": committed_photos()}
    if mismatch == "hash":
        manifest["photos"][1]["sha256"] = "0" * 64
        differs = manifest["photos"][1]["file"]
    elif mismatch == "missing":
        differs = manifest["photos"].pop(3)["file"]
    else:
        differs = "other-photo.jpg"
        manifest["photos"].append({"file": differs, "from": "elsewhere", "sha256": "0" * 64})
    check = tmp_path / "other.json"
    check.write_text(json.dumps(manifest))
    dest = tmp_path / "new" / "photos"

    exit_code = photos.main([str(dest), "--check", str(check)])

    assert_one_line_error(exit_code, capsys, f"differ from {check}", differs)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("text", ["{}", "not json", '{"photos": [{"name": "x"}]}'])
def test_check_with_a_file_that_is_no_manifest_is_one_line_and_writes_nothing(
    text, tmp_path, capsys
):
    check = tmp_path / "photos.json"
    check.write_text(text)
    exit_code = photos.main([str(tmp_path / "photos"), "--check", str(check)])
    assert_one_line_error(exit_code, capsys, f"--check {check}: not a photos.json manifest")
    assert not (tmp_path / "photos").exists()


def test_a_folder_that_holds_other_files_is_refused(tmp_path, capsys):
    dest = tmp_path / "photos"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    exit_code = photos.main([str(dest)])
    assert_one_line_error(exit_code, capsys, "notes.txt", "give an empty or new folder")
    assert [path.name for path in dest.iterdir()] == ["notes.txt"]
    assert (dest / "notes.txt").read_text() == "mine"


def test_a_file_in_the_folders_place_is_refused(tmp_path, capsys):
    dest = tmp_path / "photos"
    dest.write_text("mine")
    assert_one_line_error(photos.main([str(dest)]), capsys, "is not a folder")
    assert dest.read_text() == "mine"


def test_a_missing_package_is_one_line_error_naming_what_to_install(tmp_path, monkeypatch, capsys):
    import_module = photos.importlib.import_module

    def without_skimage(name):
        if name == "skimage":
            raise ImportError(name)
        return import_module(name)

    monkeypatch.setattr(photos.importlib, "import_module", without_skimage)
    exit_code = photos.main([str(tmp_path / "photos")])
    assert_one_line_error(exit_code, capsys, "skimage is not installed: pip install scikit-image")
    assert not (tmp_path / "photos").exists()


def test_the_photo_lists_folder_builds_the_probes_task_sets(folder):
    """The first run of docs/collapse/study_c/stage_c_photos.txt, its --image-source pointed at the
    folder: 4 training tasks on 2 photographs (--targets-per-image 2), the held-out task on a third,
    views of 32 px, as the probe builds them."""
    line = next(
        line
        for line in (STUDY_C / "stage_c_photos.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    args = tyro.cli(probe.Args, args=shlex.split(line)[2:])
    assert Path(args.image_source).parts == folder.parts[-2:] == ("data", "photos")
    assert (args.num_tasks, args.view_size, args.targets_per_image) == (4, 32, 2)

    train, test = envs.make_task_sets(
        args.num_tasks,
        1,
        image_source=folder,
        image_size=args.image_size,
        view_size=args.view_size,
        seed=args.seed,
        targets_per_image=args.targets_per_image,
    )

    assert (train.num_tasks, train.num_images, test.num_tasks, test.num_images) == (4, 2, 1, 1)
    assert list(train.task_images) == [0, 0, 1, 1]
    # distinct targets on each photograph
    targets = [tuple(target) for target in train.targets.tolist()]
    assert targets[0] != targets[1] and targets[2] != targets[3]
    photographs = {folder / photo["file"] for photo in committed_photos()}
    assert {Path(name) for name in train.image_names + test.image_names} <= photographs
    assert not set(train.image_names) & set(test.image_names)
    assert train.levels[0].shape == (2, 32, 32, 3) and test.levels[0].shape == (1, 32, 32, 3)
