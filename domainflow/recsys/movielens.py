"""MovieLens-100K: fetch it from the ``recbole==1.2.1`` wheel and read its atomic files.

Why from a wheel: the GroupLens licence forbids redistribution, so the data is never committed;
the package registry is the one network source this project may use, and recbole ships the
dataset in its "atomic file" format (tab-separated, typed headers such as ``user_id:token``).
Fetching is idempotent: nothing is downloaded when the three files are already there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

from domainflow import settings
from domainflow.atomic import build_atomically

RECBOLE_REQUIREMENT = "recbole==1.2.1"
WHEEL_FOLDER = "recbole/dataset_example/ml-100k/"
FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")

GROUPLENS_TERMS = """\
MovieLens-100K is provided by GroupLens Research (University of Minnesota) under these terms:
  * it may not be redistributed (hence fetched here, never committed), nor used commercially
    without permission;
  * it is provided "as is", without warranty;
  * publications using it must cite:
    F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and Context.
    ACM Transactions on Interactive Intelligent Systems (TiiS) 5, 4, Article 19.
    https://doi.org/10.1145/2827872
Full terms: https://files.grouplens.org/datasets/movielens/ml-100k-README.txt"""


def default_dir() -> Path:
    """``<data dir>/ml-100k`` (git-ignored)."""
    return settings.data_dir() / "ml-100k"


def is_present(target: Path | None = None) -> bool:
    target = Path(target) if target else default_dir()
    return all((target / name).is_file() and (target / name).stat().st_size > 0 for name in FILES)


def fetch_movielens(target: Path | None = None, *, quiet: bool = False) -> Path:
    """Download the recbole wheel with pip (no dependencies) and extract the ml-100k folder into ``target``.

    Idempotent; the folder is assembled in a private folder and renamed into place
    (:func:`domainflow.atomic.build_atomically`), so a crash never leaves a half-extracted dataset
    that looks complete, and two processes fetching at once do not clobber each other.
    """
    target = Path(target) if target else default_dir()
    if not quiet:
        print(GROUPLENS_TERMS)
    if is_present(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="recbole-wheel-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            RECBOLE_REQUIREMENT,
            "-d",
            tmp,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {RECBOLE_REQUIREMENT} ({' '.join(command)}): {done.stderr.strip()[-800:]}"
            )

        def extract(folder: Path) -> None:
            with zipfile.ZipFile(wheels[0]) as wheel:
                members = [n for n in wheel.namelist() if n.startswith(WHEEL_FOLDER) and not n.endswith("/")]
                missing = [name for name in FILES if WHEEL_FOLDER + name not in members]
                if missing:
                    raise RuntimeError(f"{wheels[0].name} lacks {missing} under {WHEEL_FOLDER}")
                for member in members:
                    (folder / Path(member).name).write_bytes(wheel.read(member))

        if target.exists() and not is_present(target):
            shutil.rmtree(target)  # incomplete (not published by build_atomically): unusable
        build_atomically(target, extract)
    if not quiet:
        print(f"MovieLens-100K extracted to {target}")
    return target


def read_atomic(path: Path) -> pd.DataFrame:
    """A recbole atomic file as a frame; ``name:type`` headers become ``name`` (types: token, float, token_seq).

    Not read by :func:`domainflow.data.tables.read_table`: this is recbole's own tab-separated
    format (unquoted, typed headers), not a user file. The index holds file lines (header = line 1),
    as the shared reader's does, so validation errors point at the same lines.
    """
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3, encoding="utf-8")
    frame.columns = [c.split(":", 1)[0] for c in frame.columns]
    frame.index = pd.RangeIndex(2, len(frame) + 2, name="line")
    return frame


def load_frames(source: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """The recbole files as the generic interactions + items frames that :mod:`.data` validates.

    Interactions: ``user_id, item_id, rating, timestamp``; items: ``item_id, title, year, genres``
    (genres separated by ``|``). Going through the generic columns means MovieLens is validated by
    exactly the code that validates a user's own files. Returns the frames and their file names.
    """
    source = Path(source) if source else default_dir()
    if not is_present(source):
        raise FileNotFoundError(
            f"MovieLens-100K is not in {source}: run `python scripts/fetch_movielens.py` "
            f"(or `domainflow run recommendation`, which fetches it)"
        )
    inter_path, item_path = source / "ml-100k.inter", source / "ml-100k.item"
    inter = read_atomic(inter_path)[["user_id", "item_id", "rating", "timestamp"]]
    raw = read_atomic(item_path)
    items = pd.DataFrame(
        {
            "item_id": raw["item_id"],
            "title": raw["movie_title"].str.strip(),
            "year": raw["release_year"],
            "genres": raw["class"].str.split().str.join("|"),
        },
        index=raw.index,
    )
    return inter, items, {"interactions": str(inter_path), "items": str(item_path)}
