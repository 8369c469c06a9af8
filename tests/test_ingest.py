"""Ingest (domainflow.data and the tasks.ingest wrapper) on real Banking77 rows: what a good slice produces,
how each kind of bad data is reported, labels taken from the data, and how output folders are keyed."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_from_disk
from prefect import flow
from prefect.context import TaskRunContext
from prefect.serializers import JSONSerializer
from prefect.states import Failed

from domainflow.catalog import get_domain
from domainflow.data import dataset as dataset_module
from domainflow.data import tables
from domainflow.data.dataset import dataset_summary_markdown, ingest_dataset, read_ingest_report
from domainflow.data.hub import ingest_hub_dataset
from domainflow.data.labels import ids_to_names
from domainflow.data.problems import DataValidationError
from domainflow.data.splitting import allocate
from domainflow.data.tables import read_table
from domainflow.spec import DataSlice, label_index
from tasks.caching import code_fingerprint
from tasks.ingest import _retry_unless_invalid_data, ingest

try:  # tests/ on sys.path (pytest's default while tests/ is no package)
    from data_helpers import (
        BANKING77_DIR,
        banking77_slice,
        csv_line_of,
        write_banking77_slice,
        write_csv,
        write_jsonl,
        write_parquet,
    )
    from finance_helpers import finance_slice
except ImportError:  # tests/ became a package
    from tests.data_helpers import (
        BANKING77_DIR,
        banking77_slice,
        csv_line_of,
        write_banking77_slice,
        write_csv,
        write_jsonl,
        write_parquet,
    )
    from tests.finance_helpers import finance_slice

LABELS = ["card_arrival", "card_linking", "exchange_rate", "age_limit", "pin_blocked"]
PER_CLASS_TRAIN = 20
PER_CLASS_TEST = 5


@pytest.fixture(scope="module")
def spec():
    return get_domain("customer_service")


@pytest.fixture
def train_rows():
    return banking77_slice("train", LABELS, PER_CLASS_TRAIN)


@pytest.fixture
def test_rows():
    return banking77_slice("test", LABELS, PER_CLASS_TEST)


def run(spec, out_dir: Path, train: Path, test: Path, **kwargs):
    """Ingest with the spec's data slice (or a DataSlice given directly) under the spec's name."""
    data, domain = (spec, "customer_service") if isinstance(spec, DataSlice) else (spec.data_slice(), spec.name)
    return ingest_dataset(data, domain, out_dir, train_path=train, test_path=test, **kwargs)


def slice_of(spec, **changes) -> DataSlice:
    """The spec's data slice with some fields changed (validated afresh, as a domain file would be)."""
    return DataSlice.model_validate({**spec.data_slice().model_dump(), **changes})


def contents(ref) -> dict[str, list[tuple[str, int]]]:
    dataset = load_from_disk(ref.path)
    return {split: list(zip(dataset[split]["text"], dataset[split]["label"], strict=True)) for split in dataset}


def expect_error(spec, tmp_path: Path, train: Path, test: Path, *fragments: str) -> str:
    with pytest.raises(DataValidationError) as caught:
        run(spec, tmp_path / "out", train, test)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in message:\n{message}"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "a failed ingest wrote output"
    return message


# --------------------------------------------------------------------------- good data


def test_good_csv_slice_gives_three_stratified_splits(spec, tmp_path):
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    ref = run(spec, tmp_path / "out", train, test)

    dataset = load_from_disk(ref.path)
    assert isinstance(dataset, DatasetDict)
    assert set(dataset) == {"train", "validation", "test"}
    for split in dataset.values():
        assert split.column_names == ["text", "label"]
        assert split.features["text"].dtype == "string"
        assert split.features["label"].names == list(spec.label_names)
        assert all(0 <= label < spec.num_labels for label in split["label"])
    assert ref.num_rows == {name: dataset[name].num_rows for name in dataset}
    assert ref.num_rows["train"] + ref.num_rows["validation"] == len(LABELS) * PER_CLASS_TRAIN
    assert ref.num_rows["test"] == len(LABELS) * PER_CLASS_TEST
    assert ref.label_names == list(spec.label_names)

    # every output row keeps its source label, and validation holds every class in proportion
    source = {row["text"]: row["category"] for row in banking77_slice("train", LABELS, PER_CLASS_TRAIN)}
    source.update({row["text"]: row["category"] for row in banking77_slice("test", LABELS, PER_CLASS_TEST)})
    for split in dataset.values():
        for text, label in zip(split["text"], split["label"], strict=True):
            assert spec.label_names[label] == source[text]
    expected = {spec.label_index(name) for name in LABELS}
    validation_counts = Counter(dataset["validation"]["label"])
    assert set(validation_counts) == expected
    assert set(validation_counts.values()) == {round(spec.validation_fraction * PER_CLASS_TRAIN)}
    assert set(dataset["test"]["label"]) == expected

    report = read_ingest_report(ref.path)
    assert Path(ref.path).name == ref.fingerprint == report["fingerprint"]
    assert report["test_fingerprint"] == ref.test_fingerprint
    assert report["num_rows"] == ref.num_rows
    assert report["dropped_test_overlaps"] == 0 and report["dropped_exact_duplicates"] == 0
    assert report["test_overlaps"] == [] and report["exact_duplicates"] == [] and report["leakage"] == "drop"
    assert report["sources"]["train"]["path"] == str(train.resolve())
    assert [p.name for p in (tmp_path / "out").iterdir()] == [ref.fingerprint], "staging folder left behind"


def test_fingerprint_is_a_function_of_content_and_recipe(spec, tmp_path):
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    first = run(spec, tmp_path / "out-a", train, test)
    again = run(spec, tmp_path / "out-b", train, test)
    assert (again.fingerprint, again.test_fingerprint) == (first.fingerprint, first.test_fingerprint)
    assert contents(again) == contents(first)

    smaller = run(spec, tmp_path / "out-a", train, test, max_train_samples=60)
    assert smaller.fingerprint != first.fingerprint
    assert smaller.test_fingerprint == first.test_fingerprint  # same test split, comparable models

    other_seed = run(spec, tmp_path / "out-a", train, test, seed=7)
    assert other_seed.fingerprint != first.fingerprint

    raw = bytearray(train.read_bytes())
    first_text = raw.index(b"\n") + 1  # first byte of line 2
    raw[first_text] = ord(chr(raw[first_text]).swapcase())  # one byte, same path
    train.write_bytes(bytes(raw))
    edited = run(spec, tmp_path / "out-a", train, test)
    assert edited.fingerprint != first.fingerprint
    assert edited.test_fingerprint == first.test_fingerprint
    assert Path(first.path).is_dir() and Path(edited.path).is_dir()  # old versions are kept, never overwritten


def test_finished_dataset_is_reused_without_reading(spec, tmp_path, monkeypatch):
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    first = run(spec, tmp_path / "out", train, test)

    def fail(path):
        raise AssertionError(f"read {path} although the dataset exists")

    monkeypatch.setattr(tables, "read_table", fail)
    assert run(spec, tmp_path / "out", train, test) == first


def test_crash_while_writing_leaves_nothing_that_looks_finished(spec, tmp_path, monkeypatch):
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    original = DatasetDict.save_to_disk

    def crash(self, path, *args, **kwargs):
        original(self, path, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(DatasetDict, "save_to_disk", crash)
    with pytest.raises(OSError, match="disk full"):
        run(spec, tmp_path / "out", train, test)
    assert list((tmp_path / "out").iterdir()) == []

    monkeypatch.setattr(DatasetDict, "save_to_disk", original)
    ref = run(spec, tmp_path / "out", train, test)
    assert read_ingest_report(ref.path)["fingerprint"] == ref.fingerprint


def test_jsonl_json_and_parquet_give_the_same_splits_as_csv(spec, tmp_path, train_rows, test_rows):
    writers = {
        "csv": write_csv,
        "jsonl": write_jsonl,
        "parquet": write_parquet,
        "json": lambda path, rows: path.write_text(json.dumps(rows)),
    }
    refs = {}
    for suffix, write in writers.items():
        src = tmp_path / suffix
        src.mkdir()
        write(src / f"train.{suffix}", train_rows)
        write(src / f"test.{suffix}", test_rows)
        refs[suffix] = run(spec, tmp_path / "out", src / f"train.{suffix}", src / f"test.{suffix}")
    baseline = contents(refs["csv"])
    for suffix, ref in refs.items():
        assert contents(ref) == baseline, suffix
        assert ref.test_fingerprint == refs["csv"].test_fingerprint
    assert len({ref.fingerprint for ref in refs.values()}) == len(refs)  # different bytes, different folders


def test_integer_label_ids_are_accepted(spec, tmp_path, train_rows, test_rows):
    by_name = run(
        spec,
        tmp_path / "out",
        write_csv(tmp_path / "n" / "train.csv", train_rows),
        write_csv(tmp_path / "n" / "test.csv", test_rows),
    )

    def as_ids(rows):
        return [{"text": row["text"], "category": spec.label_index(row["category"])} for row in rows]

    csv_ids = run(
        spec,
        tmp_path / "out",
        write_csv(tmp_path / "i" / "train.csv", as_ids(train_rows)),
        write_csv(tmp_path / "i" / "test.csv", as_ids(test_rows)),
    )
    jsonl_ids = run(
        spec,
        tmp_path / "out",
        write_jsonl(tmp_path / "j" / "train.jsonl", as_ids(train_rows)),
        write_jsonl(tmp_path / "j" / "test.jsonl", as_ids(test_rows)),
    )
    assert contents(csv_ids) == contents(by_name) == contents(jsonl_ids)


def test_leakage_drop_removes_exact_and_near_copies_of_test_texts_from_train(
    spec, tmp_path, train_rows, test_rows, caplog
):
    """One policy for both kinds (the default, ``leakage = "drop"``): each train row is named in the
    warning and listed in the report, and the test file is left as published."""
    variant = "  " + "  ".join(test_rows[1]["text"].upper().split()) + "\n"
    train_rows.append({"text": variant, "category": test_rows[1]["category"]})
    train_rows.append(dict(test_rows[2]))  # byte-identical: stopped the run before, dropped now
    near_line, exact_line = (csv_line_of(train_rows, len(train_rows) - k) for k in (2, 1))
    with caplog.at_level("WARNING", logger="domainflow.data.validation"):
        ref = run(
            spec,
            tmp_path / "out",
            write_csv(tmp_path / "train.csv", train_rows),
            write_csv(tmp_path / "test.csv", test_rows),
        )

    report = read_ingest_report(ref.path)
    assert report["leakage"] == "drop" and report["dropped_test_overlaps"] == 2
    assert [(o["train"], o["test"], o["match"]) for o in report["test_overlaps"]] == [
        (f"train.csv line {near_line}", "test.csv line 3", "case/whitespace"),
        (f"train.csv line {exact_line}", "test.csv line 4", "exact"),
    ]
    assert report["test_overlaps"][0]["train_text"] == variant
    warning = " ".join(r.getMessage() for r in caplog.records if "whose text is in test" in r.getMessage())
    assert f"train.csv line {near_line} ~ test.csv line 3" in warning
    assert f"train.csv line {exact_line} = test.csv line 4" in warning
    output = contents(ref)
    trained = {text for text, _ in output["train"] + output["validation"]}
    assert variant not in trained and test_rows[2]["text"] not in trained
    assert ref.num_rows["train"] + ref.num_rows["validation"] == len(LABELS) * PER_CLASS_TRAIN
    assert [text for text, _ in output["test"]] == [row["text"] for row in test_rows]  # test is untouched
    assert "(leakage = drop): 2" in dataset_summary_markdown(report)


def test_exact_duplicates_with_the_same_label_are_dropped(spec, tmp_path, train_rows, test_rows):
    train_rows.append(dict(train_rows[0]))
    ref = run(
        spec,
        tmp_path / "out",
        write_csv(tmp_path / "train.csv", train_rows),
        write_csv(tmp_path / "test.csv", test_rows),
    )
    assert read_ingest_report(ref.path)["dropped_exact_duplicates"] == 1
    assert ref.num_rows["train"] + ref.num_rows["validation"] == len(LABELS) * PER_CLASS_TRAIN


def test_limits_take_stratified_subsamples(spec, tmp_path):
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    ref = run(spec, tmp_path / "out", train, test, max_train_samples=30, max_test_samples=20)
    dataset = load_from_disk(ref.path)
    assert ref.num_rows["train"] + ref.num_rows["validation"] == 30
    assert ref.num_rows["test"] == 20
    expected = {spec.label_index(name) for name in LABELS}
    train_labels = list(dataset["train"]["label"]) + list(dataset["validation"]["label"])
    assert Counter(train_labels) == {label: 6 for label in expected}
    assert set(dataset["validation"]["label"]) == expected
    assert Counter(dataset["test"]["label"]) == {label: 4 for label in expected}


def test_allocation_keeps_two_per_class_where_the_budget_allows():
    quotas = allocate({0: 100, 1: 3, 2: 1}, 10)
    assert sum(quotas.values()) == 10
    assert quotas[1] >= 2 and quotas[2] == 1
    tight = allocate({0: 50, 1: 50, 2: 50}, 4)
    assert sum(tight.values()) == 4 and min(tight.values()) >= 1


def test_full_banking77_split_passes(spec, tmp_path):
    """The shipped split has 7 train/test pairs differing only by whitespace/case and 4 repeated train rows."""
    ref = run(spec, tmp_path / "out", BANKING77_DIR / "train.csv", BANKING77_DIR / "test.csv")
    report = read_ingest_report(ref.path)
    assert report["dropped_test_overlaps"] == 7 == len(report["test_overlaps"])
    assert {overlap["match"] for overlap in report["test_overlaps"]} == {"case/whitespace"}
    assert report["dropped_exact_duplicates"] == 4 == len(report["exact_duplicates"])
    assert ref.num_rows["test"] >= spec.min_test_rows
    assert ref.num_rows["test"] == 3080
    assert ref.num_rows["train"] + ref.num_rows["validation"] == 10003 - 7 - 4
    assert all(len(report["label_counts"][split]) == spec.num_labels for split in ("train", "validation", "test"))


def test_hub_path_maps_class_ids_by_name(spec, tmp_path, monkeypatch, train_rows, test_rows):
    """No hub access here: load_dataset is replaced by the same rows with a hub-style ClassLabel
    whose id order differs from the spec's, under the hub's column name ``label``."""
    hub_names = sorted(spec.label_names, reverse=True)
    features = Features({"text": Value("string"), "label": ClassLabel(names=hub_names)})

    def as_hub(rows):
        columns = {"text": [r["text"] for r in rows], "label": [hub_names.index(r["category"]) for r in rows]}
        return Dataset.from_dict(columns, features=features)

    calls = []

    def fake_load_dataset(name, config=None):
        calls.append((name, config))
        return DatasetDict({"train": as_hub(train_rows), "test": as_hub(test_rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setenv("DOMAINFLOW_ONLINE", "0")
    with pytest.raises(RuntimeError, match="DOMAINFLOW_ONLINE"):
        ingest_hub_dataset(spec.data_slice(), spec.source, spec.name, tmp_path / "out")
    monkeypatch.setenv("DOMAINFLOW_ONLINE", "1")
    hub = ingest_hub_dataset(spec.data_slice(), spec.source, spec.name, tmp_path / "out")
    assert calls == [(spec.source.hf_dataset, spec.source.hf_config)]
    files = run(
        spec,
        tmp_path / "out",
        write_csv(tmp_path / "train.csv", train_rows),
        write_csv(tmp_path / "test.csv", test_rows),
    )
    assert contents(hub) == contents(files)
    assert hub.test_fingerprint == files.test_fingerprint


# --------------------------------------------------------------------------- labels taken from the data


def test_labels_are_taken_from_the_training_data_when_the_domain_lists_none(spec, tmp_path, train_rows, test_rows):
    data = slice_of(spec, label_names=None)
    train = write_csv(tmp_path / "train.csv", train_rows)
    ref = run(data, tmp_path / "out", train, write_csv(tmp_path / "test.csv", test_rows))
    assert ref.label_names == sorted(LABELS)  # sorted, not in order of appearance
    dataset = load_from_disk(ref.path)
    source = {row["text"]: row["category"] for row in train_rows + test_rows}
    for split in dataset.values():
        assert split.features["label"].names == sorted(LABELS)
        assert all(
            ref.label_names[label] == source[text] for text, label in zip(split["text"], split["label"], strict=True)
        )
    report = read_ingest_report(ref.path)
    assert report["label_names"] == sorted(LABELS) and report["labels_inferred_from"] == "train.csv"
    assert "taken from `train.csv`" in dataset_summary_markdown(report)
    # the same rows with the domain's own list: same texts, same names, different ids and folder
    listed = run(spec, tmp_path / "out", train, tmp_path / "test.csv")
    assert listed.fingerprint != ref.fingerprint
    assert listed.test_fingerprint == ref.test_fingerprint  # (text, label name) pairs are the same


def test_integer_labels_from_the_data_sort_numerically(spec, tmp_path, train_rows, test_rows):
    codes = dict(zip(LABELS, [10, 2, 33, 1, 100], strict=True))

    def coded(rows):
        return [{"text": row["text"], "category": codes[row["category"]]} for row in rows]

    data = slice_of(spec, label_names=None)
    csv_ref = run(
        data,
        tmp_path / "out",
        write_csv(tmp_path / "c" / "train.csv", coded(train_rows)),
        write_csv(tmp_path / "c" / "test.csv", coded(test_rows)),
    )
    assert csv_ref.label_names == ["1", "2", "10", "33", "100"]
    jsonl_ref = run(
        data,
        tmp_path / "out",
        write_jsonl(tmp_path / "j" / "train.jsonl", coded(train_rows)),
        write_jsonl(tmp_path / "j" / "test.jsonl", coded(test_rows)),
    )
    assert contents(jsonl_ref) == contents(csv_ref)  # 10 in JSON and "10" in CSV are one label
    assert (
        sorted(["b", "a", "10", "9"])
        == run(
            data,
            tmp_path / "out",
            write_csv(
                tmp_path / "m" / "train.csv",
                [{"text": r["text"], "category": ["b", "a", "10", "9", "a"][i % 5]} for i, r in enumerate(train_rows)],
            ),
            write_csv(tmp_path / "m" / "test.csv", [{"text": r["text"], "category": "a"} for r in test_rows]),
        ).label_names
    )  # mixed names and digits sort as strings


def test_a_label_only_in_test_is_rejected_with_file_and_line(spec, tmp_path, train_rows, test_rows):
    data = slice_of(spec, label_names=None)
    test_rows[7]["category"] = "brand_new_intent"
    test = write_csv(tmp_path / "test.csv", test_rows)
    expect_error(
        data,
        tmp_path,
        write_csv(tmp_path / "train.csv", train_rows),
        test,
        "test.csv",
        "column 'category'",
        "label not in the training data",
        f"line {csv_line_of(test_rows, 7)} ('brand_new_intent')",
        "found in train.csv",
        "'age_limit'",
    )


def test_inferred_labels_are_names_not_ids(spec, tmp_path, train_rows, test_rows):
    """With labels from the data, a test value 0 is the label named "0", which train lacks: no id lookup."""
    data = slice_of(spec, label_names=None)
    test_rows[2]["category"] = 0
    expect_error(
        data,
        tmp_path,
        write_csv(tmp_path / "train.csv", train_rows),
        write_jsonl(tmp_path / "test.jsonl", test_rows),
        "test.jsonl",
        "label not in the training data",
        "line 3 (0)",
    )


def test_inferred_labels_need_two_classes(spec, tmp_path, train_rows, test_rows):
    data = slice_of(spec, label_names=None)
    one = [{"text": row["text"], "category": "card_arrival"} for row in train_rows]
    expect_error(
        data,
        tmp_path,
        write_csv(tmp_path / "train.csv", one),
        write_csv(tmp_path / "test.csv", [dict(r, category="card_arrival") for r in test_rows]),
        "train.csv",
        "fewer than two labels",
        "'card_arrival'",
    )


# --------------------------------------------------------------------------- output folders


def test_a_changed_data_slice_or_code_gives_another_folder(spec, tmp_path):
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    first = run(spec, tmp_path / "out", train, test)
    wider = run(slice_of(spec, validation_fraction=0.2), tmp_path / "out", train, test)
    assert wider.fingerprint != first.fingerprint and wider.path != first.path
    assert wider.num_rows["validation"] == 2 * first.num_rows["validation"]  # the new value shows in the output
    more_labels = run(slice_of(spec, label_names=(*spec.label_names, "new_intent")), tmp_path / "out", train, test)
    assert more_labels.fingerprint != first.fingerprint and len(more_labels.label_names) == spec.num_labels + 1
    stricter = run(slice_of(spec, min_examples_per_class=6), tmp_path / "out", train, test)
    assert stricter.fingerprint != first.fingerprint
    other_code = run(spec, tmp_path / "out", train, test, code_key="another-version")
    assert other_code.fingerprint != first.fingerprint
    assert read_ingest_report(other_code.path)["recipe"]["code"] == "another-version"
    assert run(spec, tmp_path / "out", train, test) == first  # nothing changed: the same folder
    assert len(list((tmp_path / "out").iterdir())) == 5


def test_two_builds_of_the_same_key_do_not_clobber_each_other(spec, tmp_path, monkeypatch):
    """A second run publishes the same folder while the first is still writing its own private copy:
    the first keeps the published folder, deletes only its own copy, and both get the same record."""
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    original = DatasetDict.save_to_disk
    inner: list = []

    def save_while_another_run_publishes(self, path, *args, **kwargs):
        original(self, path, *args, **kwargs)
        if not inner:  # the outer build has written its copy; now a concurrent run completes
            inner.append(None)
            inner[0] = run(spec, tmp_path / "out", train, test)
            assert Path(path).is_dir(), "the other run deleted this run's private folder"

    monkeypatch.setattr(DatasetDict, "save_to_disk", save_while_another_run_publishes)
    outer = run(spec, tmp_path / "out", train, test)
    assert inner[0] == outer
    assert [p.name for p in (tmp_path / "out").iterdir()] == [outer.fingerprint], "a private folder was left behind"
    assert read_ingest_report(outer.path)["fingerprint"] == outer.fingerprint
    assert load_from_disk(outer.path)["test"].num_rows == outer.num_rows["test"]


# --------------------------------------------------------------------------- bad data


def test_missing_column(spec, tmp_path, train_rows, test_rows):
    renamed = [{"text": r["text"], "intent": r["category"]} for r in train_rows]
    train = write_csv(tmp_path / "train.csv", renamed, columns=("text", "intent"))
    test = write_csv(tmp_path / "test.csv", test_rows)
    expect_error(spec, tmp_path, train, test, "train.csv", "missing column", "'category'", "'intent'", "line 1")


def test_empty_text(spec, tmp_path, train_rows, test_rows):
    train_rows[3]["text"] = "   "
    train = write_csv(tmp_path / "train.csv", train_rows)
    message = expect_error(
        spec,
        tmp_path,
        train,
        write_csv(tmp_path / "test.csv", test_rows),
        "train.csv",
        "column 'text'",
        "empty or whitespace-only text",
        f"line {csv_line_of(train_rows, 3)}",
    )
    assert "header being line 1" in message  # says which numbering it uses


def test_line_numbers_follow_multiline_csv_cells(spec, tmp_path, train_rows, test_rows):
    train_rows[0]["text"] = "first line\nsecond line of the same text"
    train_rows[2]["text"] = ""
    train = write_csv(tmp_path / "train.csv", train_rows)
    expect_error(
        spec,
        tmp_path,
        train,
        write_csv(tmp_path / "test.csv", test_rows),
        "train.csv",
        "empty or whitespace-only text (1 found): line 5\n",
    )
    assert csv_line_of(train_rows, 2) == 5


def test_many_problems_are_counted_in_one_message(spec, tmp_path, train_rows, test_rows):
    for row in train_rows[:12]:
        row["text"] = ""
    train_rows[40]["category"] = "not_an_intent"
    train = write_csv(tmp_path / "train.csv", train_rows)
    message = expect_error(
        spec,
        tmp_path,
        train,
        write_csv(tmp_path / "test.csv", test_rows),
        "(12 found)",
        "and 2 more",
        "line 2",
        "unknown label",
        "2 kinds of data problems",
    )
    assert "line 14" not in message  # only the first 10 are listed


def test_non_text_values_in_jsonl(spec, tmp_path, train_rows, test_rows):
    train_rows[1]["text"] = 12345
    train_rows[4]["text"] = None
    train_rows[6]["text"] = ["a", "list"]
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    expect_error(
        spec,
        tmp_path,
        train,
        write_jsonl(tmp_path / "test.jsonl", test_rows),
        "train.jsonl",
        "column 'text'",
        "non-text value",
        "line 2 (12345, int)",
        "line 5 (null)",
        "line 7 (['a', 'list'], list)",
    )


def test_unknown_label(spec, tmp_path, train_rows, test_rows):
    test_rows[7]["category"] = "not_an_intent"
    test = write_csv(tmp_path / "test.csv", test_rows)
    expect_error(
        spec,
        tmp_path,
        write_csv(tmp_path / "train.csv", train_rows),
        test,
        "test.csv",
        "column 'category'",
        "unknown label",
        f"line {csv_line_of(test_rows, 7)} ('not_an_intent')",
        "'card_arrival'",
        "ids 0-76",
    )


def test_leakage_fail_stops_on_exact_and_near_copies_naming_both_lines(spec, tmp_path, train_rows, test_rows):
    train_rows.append(dict(test_rows[2]))
    train_rows.append({"text": test_rows[4]["text"].lower() + "  ", "category": test_rows[4]["category"]})
    train = write_csv(tmp_path / "train.csv", train_rows)
    exact_line, near_line = (csv_line_of(train_rows, len(train_rows) - k) for k in (2, 1))
    expect_error(
        slice_of(spec, leakage="fail"),
        tmp_path,
        train,
        write_csv(tmp_path / "test.csv", test_rows),
        "train.csv / test.csv, column 'text'",
        "the same text is in both train and test (leakage)",
        f"train.csv line {exact_line} = test.csv line {csv_line_of(test_rows, 2)}",
        "up to case/whitespace (leakage)",
        f"train.csv line {near_line} ~ test.csv line {csv_line_of(test_rows, 4)}",
        'leakage = "drop"',
    )


def test_leakage_policy_is_a_domain_field_and_part_of_the_dataset_key(spec, tmp_path):
    assert spec.leakage == "drop" and spec.data_slice().leakage == "drop"
    assert spec.replace(leakage="fail").data_slice().leakage == "fail"
    with pytest.raises(ValueError, match="leakage"):
        spec.replace(leakage="warn")
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    dropped = run(spec, tmp_path / "out", train, test)
    failing = run(slice_of(spec, leakage="fail"), tmp_path / "out", train, test)  # no overlap: it passes
    assert failing.fingerprint != dropped.fingerprint and contents(failing) == contents(dropped)


def test_conflicting_duplicate_labels(spec, tmp_path, train_rows, test_rows):
    assert train_rows[0]["category"] == "card_arrival"
    train_rows.append({"text": train_rows[0]["text"].lower(), "category": "card_linking"})
    train = write_csv(tmp_path / "train.csv", train_rows)
    expect_error(
        spec,
        tmp_path,
        train,
        write_csv(tmp_path / "test.csv", test_rows),
        "train.csv",
        "conflicting labels",
        "line 2 -> 'card_arrival'",
        f"line {csv_line_of(train_rows, len(train_rows) - 1)} -> 'card_linking'",
    )


def test_class_with_too_few_examples(spec, tmp_path, test_rows):
    rows = banking77_slice("train", LABELS[:4], PER_CLASS_TRAIN) + banking77_slice("train", LABELS[4:], 3)
    train = write_csv(tmp_path / "train.csv", rows)
    expect_error(
        spec,
        tmp_path,
        train,
        write_csv(tmp_path / "test.csv", test_rows),
        "train.csv",
        "column 'category'",
        f"fewer than {spec.min_examples_per_class}",
        "'pin_blocked' (3)",
    )


def test_header_only_file(spec, tmp_path, train_rows):
    train = write_csv(tmp_path / "train.csv", train_rows)
    test = write_csv(tmp_path / "test.csv", [])
    expect_error(spec, tmp_path, train, test, "test.csv", "no data rows")


def test_zero_byte_file(spec, tmp_path, test_rows):
    train = tmp_path / "train.csv"
    train.write_bytes(b"")
    expect_error(spec, tmp_path, train, write_csv(tmp_path / "test.csv", test_rows), "train.csv", "empty file")


def test_unknown_suffix(spec, tmp_path, train_rows, test_rows):
    train = write_csv(tmp_path / "train.txt", train_rows)
    expect_error(
        spec,
        tmp_path,
        train,
        write_csv(tmp_path / "test.csv", test_rows),
        "train.txt",
        "unsupported file suffix '.txt'",
    )


def test_malformed_jsonl_line(spec, tmp_path, train_rows, test_rows):
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    lines = train.read_text().splitlines()
    lines[2] = lines[2][:-1]  # drop the closing brace
    train.write_text("\n".join(lines) + "\n")
    expect_error(
        spec, tmp_path, train, write_jsonl(tmp_path / "test.jsonl", test_rows), "train.jsonl", "invalid JSON", "line 3"
    )


def test_missing_file(spec, tmp_path, test_rows):
    expect_error(
        spec,
        tmp_path,
        tmp_path / "absent.csv",
        write_csv(tmp_path / "test.csv", test_rows),
        "absent.csv",
        "no such file",
    )


def test_a_single_class_in_train_is_rejected_before_training(spec, tmp_path, train_rows, test_rows):
    """Declared labels: train may lack classes, but one class is nothing to learn (the probe would crash)."""
    one = [dict(row, category="card_arrival") for row in train_rows]
    expect_error(
        spec,
        tmp_path,
        write_csv(tmp_path / "train.csv", one),
        write_csv(tmp_path / "test.csv", test_rows),
        "train.csv, column 'category'",
        "single class",
        f"only 'card_arrival': {len(one)} row(s), line 2 to line {csv_line_of(one, len(one) - 1)}",
        "at least two classes",
    )


def test_a_single_class_left_by_max_train_samples_is_rejected(spec, tmp_path):
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    with pytest.raises(DataValidationError, match=r"single class .*max_train_samples=1"):
        run(spec, tmp_path / "out", train, test, max_train_samples=1)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_test_set_too_small_to_judge_a_model_is_rejected(spec, tmp_path, train_rows):
    assert spec.min_test_rows == 20 == DataSlice.model_fields["min_test_rows"].default
    small = banking77_slice("test", LABELS[:3], 5)
    train = write_csv(tmp_path / "train.csv", train_rows)
    test = write_csv(tmp_path / "test.csv", small)
    expect_error(spec, tmp_path, train, test, "test.csv", "15 row(s)", "fewer than min_test_rows = 20", "compare noise")
    # the limit is the domain's to set, and only accepts or refuses: it does not rename the dataset
    ref = run(slice_of(spec, min_test_rows=15), tmp_path / "out", train, test)
    assert ref.num_rows["test"] == 15
    assert run(slice_of(spec, min_test_rows=1), tmp_path / "out", train, test) == ref


def test_max_test_samples_below_min_test_rows_is_rejected(spec, tmp_path):
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    expect = "test.csv: the test set has 10 row(s) (max_test_samples=10 kept 10), fewer than min_test_rows = 20"
    with pytest.raises(DataValidationError, match=re.escape(expect)) as caught:
        run(spec, tmp_path / "out", train, test, max_test_samples=10)
    assert "raise max_test_samples" in str(caught.value)


def test_fixtures_used_by_other_tests_keep_enough_test_rows(tiny_data_dir):
    """The tiny domains other modules train on stay above the default min_test_rows (not lowered for them)."""
    floor = DataSlice.model_fields["min_test_rows"].default
    pet_clinic = Path(__file__).parent / "domain_files" / "pet_clinic" / "test.csv"
    sizes = {
        "conftest tiny_data_dir": len(read_table(tiny_data_dir / "test.csv")),
        "pet_clinic test.csv": len(read_table(pet_clinic)),
        "finance_helpers valid slice": len(finance_slice("valid", 30)),
    }
    assert sizes == {"conftest tiny_data_dir": 72, "pet_clinic test.csv": 30, "finance_helpers valid slice": 90}
    assert min(sizes.values()) >= floor


def test_lone_surrogate_in_jsonl_is_rejected_with_its_line(spec, tmp_path, train_rows, test_rows):
    """json.loads turns the escape "\\ud800" into a str that UTF-8 (and so Arrow) cannot encode:
    it used to crash at save, and the pipeline retried the crash."""
    train_rows[3]["text"] = "my card \ud800 has not arrived"
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in train_rows))  # ensure_ascii: written as \ud800
    assert "\\ud800" in train.read_text()
    expect_error(
        spec,
        tmp_path,
        train,
        write_jsonl(tmp_path / "test.jsonl", test_rows),
        "train.jsonl",
        "lone surrogate",
        "(1 found): line 4",
    )


def test_lone_surrogate_in_a_json_array_names_row_and_line(spec, tmp_path, train_rows, test_rows):
    test_rows[6]["category"] = "card_\udc00arrival"
    test = tmp_path / "test.json"
    test.write_text("[\n" + ",\n".join(json.dumps(row) for row in test_rows) + "\n]\n")  # record i on line i + 2
    expect_error(
        spec,
        tmp_path,
        write_csv(tmp_path / "train.csv", train_rows),
        test,
        "test.json",
        "lone surrogate",
        "row 7 (line 8)",
    )


def test_invalid_utf8_names_the_line_even_deep_in_a_large_file(spec, tmp_path, train_rows):
    """A decoding error of a buffered stream has an offset inside an 8 KiB chunk; the line must be the file's."""
    raw = (BANKING77_DIR / "test.csv").read_bytes()
    lines = raw.split(b"\n")
    lines[3000] = lines[3000][:1] + b"\xff\xfe" + lines[3000][1:]
    test = tmp_path / "test.csv"
    test.write_bytes(b"\n".join(lines))
    assert len(raw) > 20 * 8192  # line 3001 is far past the first chunk
    expect_error(
        spec,
        tmp_path,
        write_csv(tmp_path / "train.csv", train_rows),
        test,
        "test.csv: line 3001: not valid UTF-8",
        "byte(s) ff",
    )


def test_duplicate_keys_in_json_objects_are_rejected(spec, tmp_path, train_rows, test_rows):
    """The last value would win silently: which label did the author mean?"""
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    lines = train.read_text().splitlines()
    lines[2] = lines[2][:-1] + ', "category": "age_limit"}'
    train.write_text("\n".join(lines) + "\n")
    expect_error(
        spec,
        tmp_path,
        train,
        write_jsonl(tmp_path / "test.jsonl", test_rows),
        "train.jsonl",
        "a key given twice in one JSON object",
        "line 3 ('category')",
    )
    test = tmp_path / "test.json"
    records = [json.dumps(row) for row in test_rows]
    records[1] = records[1][:-1] + ', "text": "another text"}'
    test.write_text("[\n" + ",\n".join(records) + "\n]\n")
    expect_error(
        spec,
        tmp_path,
        write_csv(tmp_path / "train.csv", train_rows),
        test,
        "test.json",
        "a key given twice",
        "row 2 (line 3) ('text')",
    )


def test_a_file_over_max_file_mb_is_refused_before_it_is_read(spec, tmp_path, train_rows, test_rows, monkeypatch):
    train = write_csv(tmp_path / "train.csv", train_rows)
    test = write_csv(tmp_path / "test.csv", test_rows)
    baseline = run(spec, tmp_path / "ok", train, test)
    assert spec.max_file_mb == 2048
    # the limit only refuses: a changed limit reuses the same folder
    assert run(slice_of(spec, max_file_mb=4096), tmp_path / "ok", train, test) == baseline

    with open(train, "a", encoding="utf-8") as handle:
        handle.write("padding,card_arrival\n" * 60_000)  # ~1.3 MiB
    opened: list[Path] = []
    monkeypatch.setattr(tables, "read_table", lambda path, **kw: opened.append(path))
    monkeypatch.setattr(dataset_module, "file_digest", lambda path: opened.append(path))
    message = expect_error(
        slice_of(spec, max_file_mb=1), tmp_path, train, test, "train.csv: the file is 1.2 MiB", "limit of 1 MiB"
    )
    assert "max_file_mb" in message and opened == []


def test_label_ids_numbered_in_another_order_than_their_names_are_rejected(spec, tmp_path, train_rows, test_rows):
    """The file says which class each id is (label_text, as Hugging Face exports have): ids in the file's
    own order would be read as the domain's ids and relabel every row."""
    file_order = sorted(LABELS)  # age_limit, card_arrival, …: not the domain's order
    columns = ("text", "category", "category_text")

    def with_ids(rows, order):
        return [
            {"text": r["text"], "category": order.index(r["category"]), "category_text": r["category"]} for r in rows
        ]

    train = write_csv(tmp_path / "f" / "train.csv", with_ids(train_rows, file_order), columns)
    message = expect_error(
        spec,
        tmp_path,
        train,
        write_csv(tmp_path / "f" / "test.csv", with_ids(test_rows, file_order), columns),
        "train.csv, column 'category'",
        "label ids that column 'category_text' names otherwise",
        "line 2 (id 1: 'card_linking' in the domain, 'card_arrival' in 'category_text')",
        "0: file 'age_limit' / domain 'card_arrival'",
        "label_column = 'category_text'",
    )
    assert "test.csv" in message  # both files are checked
    # ids in the domain's order agree with their names: accepted, the same rows as by name
    domain_order = list(spec.label_names)
    by_ids = run(
        spec,
        tmp_path / "out",
        write_csv(tmp_path / "d" / "train.csv", with_ids(train_rows, domain_order), columns),
        write_csv(tmp_path / "d" / "test.csv", with_ids(test_rows, domain_order), columns),
    )
    by_name = run(
        spec,
        tmp_path / "out",
        write_csv(tmp_path / "train.csv", train_rows),
        write_csv(tmp_path / "test.csv", test_rows),
    )
    assert contents(by_ids) == contents(by_name)


def test_parquet_class_label_ids_are_mapped_by_their_names(spec, tmp_path, train_rows, test_rows):
    """A Parquet file written by ``datasets`` declares its ClassLabel names: its ids follow its own order."""
    file_order = sorted(spec.label_names, reverse=True)
    features = Features({"text": Value("string"), "category": ClassLabel(names=file_order)})

    def as_parquet(path, rows):
        columns = {"text": [r["text"] for r in rows], "category": [file_order.index(r["category"]) for r in rows]}
        Dataset.from_dict(columns, features=features).to_parquet(str(path))
        return path

    parquet = run(
        spec,
        tmp_path / "out",
        as_parquet(tmp_path / "train.parquet", train_rows),
        as_parquet(tmp_path / "test.parquet", test_rows),
    )
    by_name = run(
        spec,
        tmp_path / "out",
        write_csv(tmp_path / "train.csv", train_rows),
        write_csv(tmp_path / "test.csv", test_rows),
    )
    assert contents(parquet) == contents(by_name)
    assert read_ingest_report(parquet.path)["sources"]["train"]["label_ids_mapped_by_name"] == file_order


def test_labels_named_by_numbers_are_never_read_as_positions(spec, tmp_path, train_rows, test_rows):
    """With labels ["1", "2", "10", …], a value 0 is no label: read as an id it would silently be "1"."""
    codes = dict(zip(LABELS, ["1", "2", "10", "33", "100"], strict=True))
    data = slice_of(spec, label_names=tuple(codes.values()))

    def coded(rows):
        return [{"text": row["text"], "category": int(codes[row["category"]])} for row in rows]

    test = coded(test_rows)
    test[3]["category"] = 0
    expect_error(
        data,
        tmp_path,
        write_jsonl(tmp_path / "train.jsonl", coded(train_rows)),
        write_jsonl(tmp_path / "test.jsonl", test),
        "test.jsonl",
        "unknown label",
        "line 4 (0)",
        "never as an id",
    )


def test_hub_ids_past_the_end_of_a_class_label_are_reported_not_crashed():
    names = ["a", "b"]
    mapped = ids_to_names([0, 1, -1, 7, "b"], names)
    assert mapped[:3] == ["a", "b", None] and mapped[4] == "b"
    assert "id 7" in mapped[3] and label_index({"a": 0, "b": 1, "c": 2}, mapped[3]) is None


def test_read_table_keeps_empty_csv_cells_as_empty_strings(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"text": "", "category": "NA"}, {"text": "x", "category": ""}])
    frame = read_table(path)
    assert frame.index.name == "line" and list(frame.index) == [2, 3]
    assert frame["text"].tolist() == ["", "x"] and frame["category"].tolist() == ["NA", ""]


# --------------------------------------------------------------------------- Prefect wrapper


def test_validation_errors_are_not_retried_and_survive_json_results():
    assert _retry_unless_invalid_data(None, None, Failed(data=DataValidationError("train.csv: bad"))) is False
    assert _retry_unless_invalid_data(None, None, Failed(data=OSError("flaky disk"))) is True
    serializer = JSONSerializer()
    restored = serializer.loads(serializer.dumps(DataValidationError("train.csv: line 3: bad")))
    assert isinstance(restored, DataValidationError) and str(restored) == "train.csv: line 3: bad"


def test_task_options():
    assert ingest.retries == 2
    assert ingest.retry_condition_fn is _retry_unless_invalid_data
    assert ingest.persist_result is True
    assert ingest.result_serializer == "json"
    assert ingest.cache_policy is not None


def test_task_body_writes_under_the_runs_dir_outside_a_flow(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("DOMAINFLOW_HOME", str(tmp_path / "home"))
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    ref = ingest.fn(
        spec.data_slice(), "customer_service", str(train), str(test), "any-source-fingerprint", max_train_samples=50
    )
    assert Path(ref.path).parent == tmp_path / "home" / "runs" / "customer_service" / "datasets"
    assert ref.num_rows["train"] + ref.num_rows["validation"] == 50
    # the folder is keyed by the task module's code (and all it imports), not a hand-bumped version
    assert read_ingest_report(ref.path)["recipe"]["code"] == code_fingerprint("tasks.ingest")


def test_task_needs_no_domain_lookup(spec, tmp_path, monkeypatch):
    """Everything comes from the DataSlice: a domain name nobody registered ingests fine."""
    monkeypatch.setenv("DOMAINFLOW_HOME", str(tmp_path / "home"))
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    data = slice_of(spec, label_names=None)
    ref = ingest.fn(data, "not_registered_anywhere", str(train), str(test), "fp")
    assert ref.domain == "not_registered_anywhere" and ref.label_names == sorted(LABELS)


def test_summary_markdown(spec, tmp_path):
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    ref = run(spec, tmp_path / "out", train, test)
    text = dataset_summary_markdown(read_ingest_report(ref.path))
    assert ref.fingerprint in text and ref.test_fingerprint in text
    assert "| validation | 10 | 5 / 77 |" in text
    assert "whose text is in test" in text and "`card_arrival` 18" in text


def _bad_jsonl(path: Path, rows: list[dict]) -> Path:
    """A JSONL file whose line 1 holds a lone surrogate: what used to crash in Arrow and be retried."""
    rows = [dict(row) for row in rows]
    rows[0]["text"] = "my card \ud800"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _counting_reader(monkeypatch, fail_first_with: BaseException | None = None) -> list[int]:
    """Patch the reader ingest uses: record the Prefect attempt (``task_run.run_count``) of each train read."""
    attempts: list[int] = []
    original = tables.read_table

    def read(path, **kwargs):
        if Path(path).stem == "train":
            context = TaskRunContext.get()
            attempts.append(context.task_run.run_count if context else 0)
            if fail_first_with is not None and len(attempts) == 1:
                raise fail_first_with
        return original(path, **kwargs)

    monkeypatch.setattr(tables, "read_table", read)
    return attempts


def _bad_label_csv(path: Path, rows: list[dict]) -> Path:
    """A CSV whose row 4 has a label the domain does not know: bad data, the same on every read."""
    rows = [dict(row) for row in rows]
    rows[3]["category"] = "not_an_intent"
    return write_csv(path, rows)


@pytest.mark.parametrize(
    "bad_train, suffix, message",
    [
        (_bad_jsonl, "jsonl", r"train\.jsonl.*lone surrogate.*line 1"),
        (_bad_label_csv, "csv", r"train\.csv.*unknown label.*'not_an_intent'"),
    ],
    ids=["lone-surrogate", "unknown-label"],
)
def test_bad_data_fails_the_prefect_task_once_despite_its_retries(
    spec, tmp_path, monkeypatch, bad_train, suffix, message
):
    """Through a real flow: the DataValidationError is final, the task's two retries are not used."""
    monkeypatch.setenv("DOMAINFLOW_HOME", str(tmp_path / "home"))
    train = bad_train(tmp_path / f"train.{suffix}", banking77_slice("train", LABELS, PER_CLASS_TRAIN))
    test = write_jsonl(tmp_path / "test.jsonl", banking77_slice("test", LABELS, PER_CLASS_TEST))
    attempts = _counting_reader(monkeypatch)
    quick = ingest.with_options(retry_delay_seconds=0, refresh_cache=True)
    assert quick.retries == 2

    @flow(name="ingest-bad-data")
    def ingest_bad_data():
        return quick(spec.data_slice(), "customer_service", str(train), str(test), f"fp-bad-{suffix}")

    state = ingest_bad_data(return_state=True)
    assert state.is_failed()
    with pytest.raises(DataValidationError, match=message):
        state.result()
    assert attempts == [1], f"the task ran {len(attempts)} times: {attempts}"
    datasets = tmp_path / "home" / "runs" / "customer_service" / "datasets"
    assert not datasets.exists() or not any(datasets.iterdir()), "a failed ingest left a dataset behind"


def test_a_transient_os_error_is_retried_by_prefect(spec, tmp_path, monkeypatch):
    """The same task retries what can pass on a second try: a flaky read succeeds on attempt 2."""
    monkeypatch.setenv("DOMAINFLOW_HOME", str(tmp_path / "home"))
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    attempts = _counting_reader(monkeypatch, fail_first_with=OSError("flaky network disk"))
    quick = ingest.with_options(retry_delay_seconds=0, refresh_cache=True)

    @flow(name="ingest-flaky-disk")
    def ingest_flaky_disk():
        return quick(spec.data_slice(), "customer_service", str(train), str(test), "fp-flaky")

    ref = ingest_flaky_disk()
    assert attempts == [1, 2]
    assert ref.num_rows["test"] == len(LABELS) * PER_CLASS_TEST
    assert Path(ref.path).parent == tmp_path / "home" / "runs" / "customer_service" / "datasets"


def test_an_os_error_that_does_not_pass_fails_after_the_retries(spec, tmp_path, monkeypatch):
    """Retries are bounded: a read that fails every time is tried 1 + 2 times, then the flow fails with it."""
    monkeypatch.setenv("DOMAINFLOW_HOME", str(tmp_path / "home"))
    train, test = write_banking77_slice(tmp_path / "src", LABELS, PER_CLASS_TRAIN, PER_CLASS_TEST)
    attempts: list[int] = []

    def broken_disk(path, **kwargs):
        if Path(path).stem == "train":
            attempts.append(TaskRunContext.get().task_run.run_count)
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(tables, "read_table", broken_disk)
    quick = ingest.with_options(retry_delay_seconds=0, refresh_cache=True)

    @flow(name="ingest-dead-disk")
    def ingest_dead_disk():
        return quick(spec.data_slice(), "customer_service", str(train), str(test), "fp-dead-disk")

    state = ingest_dead_disk(return_state=True)
    assert state.is_failed()
    with pytest.raises(OSError, match="Input/output error"):
        state.result()
    assert attempts == [1, 2, 3]
