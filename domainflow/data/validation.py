"""The checks a classification dataset passes before any split is carved.

Why this step is strict: every later step (fine-tuning, evaluation, the champion /
challenger comparison) trusts the dataset it is handed. A bad row found here costs a
clear message naming file, line and column; the same row found three steps later costs
an hour of training and a metric nobody can explain. So:

* both files have the text and label columns, and at least one data row;
* every text is a non-empty string; every label is one of the dataset's labels (see
  :mod:`.labels`: the domain's names or ids, or the values of the training file);
* no text appears verbatim in both train and test (leakage inflates test metrics);
* no text carries two different labels inside one file;
* every class present in train has at least ``min_examples_per_class`` rows.

Two things are repaired rather than rejected, because the real public splits contain
them and they are harmless once removed: exact duplicate rows inside train (extra copies
are dropped) and train rows that differ from a test row only by case or whitespace
(dropped from train, never from test, so the test set stays the published one).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable

from domainflow.data.labels import Labels, is_missing
from domainflow.data.problems import MAX_LISTED, DataValidationError, Problems, clip
from domainflow.data.tables import Table
from domainflow.logs import run_logger
from domainflow.spec import DataSlice

__all__ = ["DataValidationError", "Prepared", "Rows", "absent_classes", "validate"]


@dataclass
class Rows:
    """Validated rows of one split, each with its source location."""

    texts: list[str]
    labels: list[int]
    where: list[str]

    def select(self, positions: Iterable[int]) -> Rows:
        chosen = list(positions)
        return Rows([self.texts[i] for i in chosen], [self.labels[i] for i in chosen], [self.where[i] for i in chosen])


@dataclass
class Prepared:
    """What validation hands to splitting: clean rows, the label list and what was repaired."""

    train: Rows
    test: Rows
    labels: Labels
    dropped_exact_duplicates: int
    near_duplicates: list[dict[str, str]]


def normalise(text: str) -> str:
    """The key under which texts differing only by case or whitespace collide."""
    return " ".join(text.lower().split())


def absent_classes(labels: Labels, rows: Rows) -> list[str]:
    present = set(rows.labels)
    return [name for index, name in enumerate(labels.names) if index not in present]


def _check_columns(data: DataSlice, domain: str, table: Table, problems: Problems) -> None:
    present = [str(column) for column in table.frame.columns]
    missing = [column for column in (data.text_column, data.label_column) if column not in present]
    if missing:
        where = "header (line 1)" if table.fmt == "csv" else "all records"
        problems.add(
            table.name,
            None,
            f"missing column(s) {missing} in the {where}; the file has columns {present}",
            hint=f"Domain {domain!r} expects text column {data.text_column!r} and label column {data.label_column!r}",
        )


def _check_rows(data: DataSlice, domain: str, labels: Labels, table: Table, problems: Problems, *,
                is_train: bool) -> Rows:
    """Type-check every text and map every label to its index; report, never coerce."""
    texts: list[str] = []
    ids: list[int] = []
    raw_texts = table.frame[data.text_column].tolist()  # tolist: numpy scalars -> Python values
    raw_labels = table.frame[data.label_column].tolist()
    where = table.where()
    for text, label, location in zip(raw_texts, raw_labels, where):
        if not isinstance(text, str):
            shown = "null" if is_missing(text) else f"{clip(text)}, {type(text).__name__}"
            problems.add(table.name, data.text_column, "non-text value", f"{location} ({shown})", note=table.note)
        elif not text.strip():
            problems.add(table.name, data.text_column, "empty or whitespace-only text", location, note=table.note)
        index = None if is_missing(label) else labels.index(label)
        if index is None:
            shown = "null" if is_missing(label) else clip(label)
            problems.add(table.name, data.label_column, labels.unknown_kind(is_train), f"{location} ({shown})",
                         hint=labels.hint(domain), note=table.note)
        texts.append(text)
        ids.append(index if index is not None else -1)
    return Rows(texts, ids, where)


def _check_conflicts(data: DataSlice, labels: Labels, table: Table, rows: Rows, problems: Problems) -> None:
    """One text with two labels teaches (or scores) a contradiction; case/whitespace variants count as one text."""
    groups: dict[str, list[int]] = defaultdict(list)
    for position, text in enumerate(rows.texts):
        groups[normalise(text)].append(position)
    for positions in groups.values():
        if len({rows.labels[p] for p in positions}) > 1:
            pairs = ", ".join(f"{rows.where[p]} -> {labels.names[rows.labels[p]]!r}" for p in positions[:MAX_LISTED])
            problems.add(
                table.name,
                data.label_column,
                "duplicate text with conflicting labels",
                f"{clip(rows.texts[positions[0]])}: {pairs}",
                note=table.note,
            )


def _check_leakage(train: Table, train_rows: Rows, test: Table, test_rows: Rows, column: str,
                   problems: Problems) -> None:
    """A test text also present in train inflates every metric measured on it.

    Only byte-identical texts are an error: the published Banking77 split has pairs that
    differ by a leading newline or a double space, which are handled as near-duplicates.
    """
    in_test: dict[str, str] = {}
    for text, where in zip(test_rows.texts, test_rows.where):
        in_test.setdefault(text, where)
    for text, where in zip(train_rows.texts, train_rows.where):
        if text in in_test:
            problems.add(
                f"{train.name} / {test.name}",
                column,
                "the same text is in both train and test (leakage)",
                f"{train.name} {where} = {test.name} {in_test[text]}: {clip(text)}",
                hint="Remove it from one of the files",
                note="; ".join(note for note in dict.fromkeys((train.note, test.note)) if note),
            )


def _drop_exact_duplicates(rows: Rows) -> tuple[Rows, list[str]]:
    """Keep the first copy of each text (compared after strip); labels already agree."""
    seen: set[str] = set()
    keep: list[int] = []
    dropped: list[str] = []
    for position, text in enumerate(rows.texts):
        key = text.strip()
        if key in seen:
            dropped.append(rows.where[position])
        else:
            seen.add(key)
            keep.append(position)
    return rows.select(keep), dropped


def _drop_near_duplicates_of_test(train: Table, train_rows: Rows, test: Table,
                                  test_rows: Rows) -> tuple[Rows, list[dict[str, str]]]:
    """Train rows equal to a test row up to case/whitespace leave train; test is never touched."""
    test_keys: dict[str, int] = {}
    for position, text in enumerate(test_rows.texts):
        test_keys.setdefault(normalise(text), position)
    keep: list[int] = []
    pairs: list[dict[str, str]] = []
    for position, text in enumerate(train_rows.texts):
        match = test_keys.get(normalise(text))
        if match is None:
            keep.append(position)
            continue
        pairs.append(
            {
                "train": f"{train.name} {train_rows.where[position]}",
                "test": f"{test.name} {test_rows.where[match]}",
                "train_text": text,
                "test_text": test_rows.texts[match],
            }
        )
    return train_rows.select(keep), pairs


def _check_class_sizes(data: DataSlice, labels: Labels, table: Table, rows: Rows) -> None:
    """Too few rows for a class makes its stratified validation slice and its metrics noise."""
    counts = Counter(rows.labels)
    small = sorted((count, label) for label, count in counts.items() if count < data.min_examples_per_class)
    if small:
        listed = ", ".join(f"{labels.names[label]!r} ({count})" for count, label in small)
        problems = Problems()
        problems.add(
            table.name,
            data.label_column,
            f"classes with fewer than {data.min_examples_per_class} training rows (min_examples_per_class), "
            f"counted after removing duplicates",
            listed,
            hint="Add examples, or remove the class's rows altogether (absent classes are allowed)",
        )
        problems.raise_if_any()
    absent = absent_classes(labels, rows)
    if absent:
        shown = ", ".join(absent[:MAX_LISTED]) + (" …" if len(absent) > MAX_LISTED else "")
        run_logger(__name__).warning("%s: %d of %d classes have no training rows (allowed): %s",
                                     table.name, len(absent), len(labels.names), shown)


def _check_enough_labels(data: DataSlice, labels: Labels, train: Table) -> None:
    """A label list read from the data with one value is no classification task (a typo'd column, usually)."""
    if labels.inferred and len(labels.names) < 2:
        found = f"only {labels.names[0]!r}" if labels.names else "none"
        raise DataValidationError(
            f"{train.name}, column {data.label_column!r}: the training data has fewer than two labels ({found}); "
            f"a classifier needs at least two (or list the domain's labels)"
        )


def validate(data: DataSlice, domain: str, train: Table, test: Table) -> Prepared:
    """Every check in order of cheapness; each stage reports all its problems at once."""
    problems = Problems()
    for table in (train, test):
        _check_columns(data, domain, table, problems)
    problems.raise_if_any()
    for table in (train, test):
        if table.frame.empty:
            problems.add(table.name, None, "no data rows (the file is empty or holds only a header)")
    problems.raise_if_any()
    labels = Labels.of(data, train.frame[data.label_column].tolist(), train.name)
    train_rows = _check_rows(data, domain, labels, train, problems, is_train=True)
    test_rows = _check_rows(data, domain, labels, test, problems, is_train=False)
    problems.raise_if_any()
    _check_enough_labels(data, labels, train)
    _check_conflicts(data, labels, train, train_rows, problems)
    _check_conflicts(data, labels, test, test_rows, problems)
    _check_leakage(train, train_rows, test, test_rows, data.text_column, problems)
    problems.raise_if_any()

    log = run_logger(__name__)
    train_rows, dropped = _drop_exact_duplicates(train_rows)
    if dropped:
        log.warning("%s: dropped %d duplicate row(s) (same text, same label): %s",
                    train.name, len(dropped), ", ".join(dropped[:MAX_LISTED]))
    train_rows, near = _drop_near_duplicates_of_test(train, train_rows, test, test_rows)
    if near:
        log.warning(
            "dropped %d train row(s) that match a test row up to case/whitespace: %s",
            len(near), "; ".join(f"{pair['train']} ~ {pair['test']}" for pair in near[:MAX_LISTED]),
        )
    _check_class_sizes(data, labels, train, train_rows)
    absent_test = absent_classes(labels, test_rows)
    if absent_test:
        log.warning("%s: %d of %d classes have no test rows", test.name, len(absent_test), len(labels.names))
    return Prepared(train_rows, test_rows, labels, len(dropped), near)
