"""Small, deterministic slices of the real Banking77 files for tests, plus writers for bad variants.

Why real rows: synthetic "text 1 / text 2" rows never have the quirks the validator
exists for (quoted multi-line texts, leading newlines, near-duplicates across splits).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

BANKING77_DIR = Path(__file__).resolve().parent.parent / "data" / "banking77"
COLUMNS = ("text", "category")

Row = dict[str, Any]


def banking77_rows(split: str) -> list[Row]:
    """All rows of the shipped ``train``/``test`` file, as dicts with ``text`` and ``category``."""
    with open(BANKING77_DIR / f"{split}.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def banking77_slice(split: str, labels: Sequence[str], per_class: int) -> list[Row]:
    """The first ``per_class`` rows of each intent in file order, intents in the order given.

    Texts are stripped of surrounding whitespace: a few real rows start with a newline,
    which would make CSV line arithmetic in tests depend on which rows were picked.
    """
    picked: list[Row] = []
    rows = banking77_rows(split)
    for label in labels:
        of_label = [{"text": row["text"].strip(), "category": label} for row in rows if row["category"] == label]
        if len(of_label) < per_class:
            raise ValueError(f"{split}.csv has only {len(of_label)} rows of {label!r}, asked for {per_class}")
        picked.extend(of_label[:per_class])
    return picked


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> Path:
    """Rows as CSV with a header; missing keys become empty cells."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(column) is None else row.get(column) for column in columns])
    return path


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line, values kept as given (so a number stays a number)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    return path


def write_parquet(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([dict(row) for row in rows]).to_parquet(path, index=False)
    return path


def write_banking77_slice(
    dst_dir: Path, labels: list[str], per_class_train: int, per_class_test: int
) -> tuple[Path, Path]:
    """Write ``train.csv`` and ``test.csv`` (columns text,category) holding real rows of the given intents."""
    dst_dir = Path(dst_dir)
    train = write_csv(dst_dir / "train.csv", banking77_slice("train", labels, per_class_train))
    test = write_csv(dst_dir / "test.csv", banking77_slice("test", labels, per_class_test))
    return train, test


def csv_line_of(rows: Sequence[Mapping[str, Any]], index: int, columns: Sequence[str] = COLUMNS) -> int:
    """The file line on which 0-based data row ``index`` starts in a CSV written by :func:`write_csv`.

    The header is line 1; a quoted cell holding a newline makes its row span several lines.
    """
    newlines = sum(str(row.get(column) or "").count("\n") for row in rows[:index] for column in columns)
    return 2 + index + newlines


def replace(record, **changes):  # noqa: ANN001, ANN201 - any spec record
    """``dataclasses.replace`` for the pydantic spec records: a validated copy with some fields changed."""
    return record.replace(**changes)


#: A user's own domain that ships nowhere in the package (five intents of a veterinary clinic).
PET_CLINIC = Path(__file__).parent / "domain_files" / "pet_clinic"


def copy_domain(tmp_path: Path, name: str, body: str) -> Path:
    """The pet clinic's data and replies in a fresh folder, with ``body`` as its domain file."""
    folder = tmp_path / name
    shutil.copytree(PET_CLINIC, folder)
    (folder / "pet_clinic.toml").unlink()
    path = folder / f"{name}.toml"
    path.write_text(body)
    return path
