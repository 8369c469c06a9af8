"""The checks a classification dataset passes before any split is carved.

Why this step is strict: every later step (fine-tuning, evaluation, the champion /
challenger comparison) trusts the dataset it is handed. A bad row found here costs a
clear message naming file, line and column; the same row found three steps later costs
an hour of training and a metric nobody can explain. So:

* both files have the text and label columns, and at least one data row;
* every text is a non-empty string; every label is one of the dataset's labels (see
  :mod:`.labels`: the domain's names or ids, or the values of the training file);
* integer ids agree with the label names the same file gives beside them (``label_text``…):
  when they do not, the file numbers its labels in another order than the domain, and reading
  its ids as the domain's would relabel every row silently;
* no text carries two different labels inside one file;
* train holds at least two classes (one class is no classifier: the linear probe would crash),
  and every class present in train has at least ``min_examples_per_class`` rows;
* the test split has at least ``min_test_rows`` rows (checked on the final split by
  :func:`check_split_sizes`): on fewer, the quality gates would compare noise.

Leakage, a train text equal to a test text exactly or up to case and whitespace, follows one
policy per domain (``leakage``): ``"drop"`` (the default) removes such rows from train with a
warning naming their lines, and lists them in the ingest report; ``"fail"`` stops with the
lines of both files. Test is never changed, so it stays the published set. Why not always stop:
widely used public splits hold such pairs, and a user should not have to edit the published
data to train on it. Exact duplicate rows inside train are repaired too (extra copies dropped).
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

__all__ = ["DataValidationError", "Prepared", "Rows", "absent_classes", "check_split_sizes", "validate"]


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
    duplicates: list[str]  # where the dropped extra copies of a train text were ("line 12")
    test_overlaps: list[dict[str, str]]  # train rows whose text is in test: dropped (leakage = "drop")


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


def _check_rows(
    data: DataSlice, domain: str, labels: Labels, table: Table, problems: Problems, *, is_train: bool
) -> Rows:
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
            problems.add(
                table.name,
                data.label_column,
                labels.unknown_kind(is_train),
                f"{location} ({shown})",
                hint=labels.hint(domain),
                note=table.note,
            )
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


# Columns in which a file may name the class its integer id stands for (Hugging Face exports carry `label_text`).
NAME_COLUMNS = ("{column}_text", "{column}_name", "label_text", "label_name")


def _name_column(data: DataSlice, table: Table) -> str | None:
    present = {str(column) for column in table.frame.columns}
    for pattern in NAME_COLUMNS:
        column = pattern.format(column=data.label_column)
        if column in present and column not in (data.label_column, data.text_column):
            return column
    return None


def _check_ids_against_names(data: DataSlice, labels: Labels, table: Table, rows: Rows, problems: Problems) -> None:
    """An id whose row names another class of the domain: the file numbers its labels in another order.

    Only rows whose label is an integer id of a listed label set are compared, and only with names
    that are labels of the domain (up to case/whitespace): a name column in another vocabulary
    ("Bearish" for "negative") says nothing about the order.
    """
    column = _name_column(data, table)
    if labels.inferred or column is None:
        return
    by_key = {normalise(name): name for name in labels.names}
    file_order: dict[int, str] = {}
    found: list[str] = []
    raw = table.frame[data.label_column].tolist()
    given = table.frame[column].tolist()
    for value, name, index, where in zip(raw, given, rows.labels, rows.where):
        named = by_key.get(normalise(name)) if isinstance(name, str) else None
        if named is None or index < 0 or not labels.is_id(value):
            continue
        file_order.setdefault(index, named)
        if named != labels.names[index]:
            found.append(f"{where} (id {index}: {labels.names[index]!r} in the domain, {name.strip()!r} in {column!r})")
    if not found:
        return
    differ = [
        f"{i}: file {file_order[i]!r} / domain {labels.names[i]!r}"
        for i in sorted(file_order)
        if file_order[i] != labels.names[i]
    ]
    shown = "; ".join(differ[:MAX_LISTED]) + (" …" if len(differ) > MAX_LISTED else "")
    kind = (
        f"label ids that column {column!r} names otherwise (the file numbers its labels in another order "
        f"than the domain, so reading its ids as the domain's would relabel rows)"
    )
    hint = (
        f"Ids in the file's order / the domain's: {shown}. Use the names (label_column = {column!r}) "
        f"or list the domain's labels in the file's order"
    )
    for item in found:
        problems.add(table.name, data.label_column, kind, item, hint=hint, note=table.note)


def _test_overlaps(
    train: Table, train_rows: Rows, test: Table, test_rows: Rows
) -> tuple[list[int], list[dict[str, str]]]:
    """Train rows whose text is a test text, exactly or up to case/whitespace: positions, and the pairs."""
    test_keys: dict[str, int] = {}
    for position, text in enumerate(test_rows.texts):
        test_keys.setdefault(normalise(text), position)
    positions: list[int] = []
    pairs: list[dict[str, str]] = []
    for position, text in enumerate(train_rows.texts):
        match = test_keys.get(normalise(text))
        if match is None:
            continue
        positions.append(position)
        pairs.append(
            {
                "train": f"{train.name} {train_rows.where[position]}",
                "test": f"{test.name} {test_rows.where[match]}",
                "match": "exact" if text == test_rows.texts[match] else "case/whitespace",
                "train_text": text,
                "test_text": test_rows.texts[match],
            }
        )
    return positions, pairs


def _apply_leakage_policy(
    data: DataSlice, train: Table, train_rows: Rows, test: Table, test_rows: Rows
) -> tuple[Rows, list[dict[str, str]]]:
    """One rule for exact and near duplicates across the splits: drop them from train, or stop (``leakage``)."""
    positions, pairs = _test_overlaps(train, train_rows, test, test_rows)
    if not pairs:
        return train_rows, []
    sign = {"exact": "=", "case/whitespace": "~"}
    if data.leakage == "fail":
        problems = Problems()
        note = "; ".join(note for note in dict.fromkeys((train.note, test.note)) if note)
        for pair in pairs:
            exact = pair["match"] == "exact"
            kind = (
                "the same text is in both train and test (leakage)"
                if exact
                else "a train text equals a test text up to case/whitespace (leakage)"
            )
            problems.add(
                f"{train.name} / {test.name}",
                data.text_column,
                kind,
                f"{pair['train']} {sign[pair['match']]} {pair['test']}: {clip(pair['train_text'])}",
                hint='Remove them from train, or set leakage = "drop" (the default) to drop them from train',
                note=note,
            )
        problems.raise_if_any()
    dropped = set(positions)
    shown = "; ".join(f"{pair['train']} {sign[pair['match']]} {pair['test']}" for pair in pairs[:MAX_LISTED])
    more = f"; … and {len(pairs) - MAX_LISTED} more" if len(pairs) > MAX_LISTED else ""
    run_logger(__name__).warning(
        'dropped %d train row(s) whose text is in test, exactly or up to case/whitespace (leakage = "drop"; '
        "all listed in the ingest report): %s%s",
        len(pairs),
        shown,
        more,
    )
    return train_rows.select(p for p in range(len(train_rows.texts)) if p not in dropped), pairs


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
        run_logger(__name__).warning(
            "%s: %d of %d classes have no training rows (allowed): %s",
            table.name,
            len(absent),
            len(labels.names),
            shown,
        )


def _check_enough_labels(data: DataSlice, labels: Labels, train: Table) -> None:
    """A label list read from the data with one value is no classification task (a typo'd column, usually)."""
    if labels.inferred and len(labels.names) < 2:
        found = f"only {labels.names[0]!r}" if labels.names else "none"
        raise DataValidationError(
            f"{train.name}, column {data.label_column!r}: the training data has fewer than two labels ({found}); "
            f"a classifier needs at least two (or list the domain's labels)"
        )


def _check_two_classes(data: DataSlice, labels: Labels, table: Table, rows: Rows, after: str) -> None:
    """One class is nothing to learn, and the linear probe (logistic regression) crashes on it."""
    present = sorted(set(rows.labels))
    if len(present) >= 2:
        return
    if present:
        found = f"only {labels.names[present[0]]!r}: {len(rows.labels)} row(s), {rows.where[0]} to {rows.where[-1]}"
    else:
        found = "no rows"
    raise DataValidationError(
        f"{table.name}, column {data.label_column!r}: the training data holds a single class ({found}{after}); "
        f"a classifier needs rows of at least two classes. Add rows of the other classes, or check that "
        f"label_column names the right column"
    )


def check_split_sizes(
    data: DataSlice,
    labels: Labels,
    train: Table,
    test: Table,
    train_rows: Rows,
    test_rows: Rows,
    max_train: int | None,
    max_test: int | None,
) -> None:
    """The final splits (after ``max_*_samples``) can still train a classifier and judge it.

    A test set of a handful of rows moves the primary metric by whole points per row, so the
    quality gates and the champion/challenger comparison would be comparing noise.
    """
    _check_two_classes(
        data,
        labels,
        train,
        train_rows,
        f", after subsampling to max_train_samples={max_train}" if max_train is not None else "",
    )
    rows = len(test_rows.texts)
    if rows >= data.min_test_rows:
        return
    cut = max_test is not None and max_test < data.min_test_rows
    limited = f" (max_test_samples={max_test} kept {rows})" if cut else ""
    raise DataValidationError(
        f"{test.name}: the test set has {rows} row(s){limited}, fewer than min_test_rows = {data.min_test_rows}: "
        f"one row moves the metrics by {100 / max(rows, 1):.1f} points, so the quality gates would compare noise. "
        f"Add test rows{', or raise max_test_samples' if cut else ''}, or lower min_test_rows in the domain "
        f"file if a rough judgement is enough"
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
    for table, rows in ((train, train_rows), (test, test_rows)):
        _check_ids_against_names(data, labels, table, rows, problems)
        _check_conflicts(data, labels, table, rows, problems)
    problems.raise_if_any()

    train_rows, overlaps = _apply_leakage_policy(data, train, train_rows, test, test_rows)
    train_rows, dropped = _drop_exact_duplicates(train_rows)
    if dropped:
        run_logger(__name__).warning(
            "%s: dropped %d duplicate row(s) (same text, same label): %s",
            train.name,
            len(dropped),
            ", ".join(dropped[:MAX_LISTED]),
        )
    _check_two_classes(
        data, labels, train, train_rows, ", after dropping duplicates and test texts" if (dropped or overlaps) else ""
    )
    _check_class_sizes(data, labels, train, train_rows)
    absent_test = absent_classes(labels, test_rows)
    if absent_test:
        run_logger(__name__).warning(
            "%s: %d of %d classes have no test rows", test.name, len(absent_test), len(labels.names)
        )
    return Prepared(train_rows, test_rows, labels, dropped, overlaps)
