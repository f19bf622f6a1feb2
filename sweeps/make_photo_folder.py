"""Write a folder of real photographs for `--image-source`, from files that installable packages
ship (no download).

    # the Stage C photo folder (docs/collapse/study_c/PLAN.md)
    python sweeps/make_photo_folder.py data/photos
    python sweeps/make_photo_folder.py data/photos --check docs/collapse/study_c/photos.json

The photographs are those of scikit-learn's `load_sample_images` (china, flower), matplotlib's
sample data (Grace Hopper) and scikit-image's data folder (colour photographs only: no greyscale
test cards, textures or text pages). Each is copied unchanged and named `<package>-<file>`. Next to
the files goes `photos.json`, with each file's source, size and SHA-256. With `--check`, the hashes
must equal those of the given manifest, e.g. the committed one of a study, so that a rerun uses the
study's exact images. Writing into a folder that already holds other files is an error.
"""

import argparse
import hashlib
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

# (package, folder inside the package, file): colour photographs, in a fixed order
PHOTOS = [
    ("sklearn", "datasets/images", "china.jpg"),
    ("sklearn", "datasets/images", "flower.jpg"),
    ("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg"),
    ("skimage", "data", "astronaut.png"),
    ("skimage", "data", "chelsea.png"),
    ("skimage", "data", "coffee.png"),
    ("skimage", "data", "hubble_deep_field.jpg"),
    ("skimage", "data", "ihc.png"),
    ("skimage", "data", "motorcycle_left.png"),
    ("skimage", "data", "rocket.jpg"),
]
INSTALL = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "skimage": "scikit-image"}


class UserError(Exception):
    """Bad input: printed as one line, no traceback."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_files() -> list:
    """[(name in the folder, source path, "package version/folder/file")] per photograph; a missing
    package is a one-line error."""
    found = []
    for package, folder, file in PHOTOS:
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise UserError(f"{package} is not installed: pip install {INSTALL[package]}") from None
        path = Path(module.__file__).parent / folder / file
        if not path.is_file():
            raise UserError(
                f"{path}: not in this {INSTALL[package]} installation (is it a trimmed install?)"
            )
        found.append(
            (
                f"{package}-{file}",
                path,
                f"{INSTALL[package]} {module.__version__}: {package}/{folder}/{file}",
            )
        )
    return found


def write_folder(dest: Path, check=None) -> dict:
    """Copy the photographs to `dest` and write its photos.json; returns the manifest. Nothing is
    written on error."""
    files = source_files()
    manifest = {
        "source": "sweeps/make_photo_folder.py",
        "photos": [
            {"file": name, "from": origin, "sha256": sha256(path)} for name, path, origin in files
        ],
    }
    if check is not None:
        try:
            expected = {
                p["file"]: p["sha256"] for p in json.loads(Path(check).read_text())["photos"]
            }
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"--check {check}: not a photos.json manifest ({type(e).__name__})"
            ) from None
        got = {p["file"]: p["sha256"] for p in manifest["photos"]}
        differ = sorted(
            name for name in set(expected) | set(got) if expected.get(name) != got.get(name)
        )
        if differ:
            raise UserError(
                f"these photographs differ from {check} (another package version?): "
                + ", ".join(differ)
            )
    wanted = {name for name, _, _ in files} | {"photos.json"}
    if dest.exists():
        if not dest.is_dir():
            raise UserError(f"{dest} exists and is not a folder")
        others = sorted(p.name for p in dest.iterdir() if p.name not in wanted)
        if others:
            raise UserError(
                f"{dest} already holds other files ({', '.join(others[:3])}); "
                "give an empty or new folder"
            )
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name, path, _ in files:
            shutil.copyfile(path, dest / name)
        (dest / "photos.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {dest}: {e.strerror}") from None
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "dest", type=Path, help="the folder to write (created; may already hold an earlier copy)"
    )
    parser.add_argument(
        "--check", type=Path, help="a photos.json whose hashes the photographs must match"
    )
    args = parser.parse_args(argv)
    try:
        manifest = write_folder(args.dest, args.check)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(manifest['photos'])} photographs to {os.path.normpath(args.dest)} "
        "(photos.json lists them)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
