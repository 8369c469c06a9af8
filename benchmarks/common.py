"""What the benchmark scripts share: the domain's labelled test texts, a probe to train from, the parser."""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any


def labelled_test_texts(domain: str, max_texts: int | None, seed: int) -> tuple[list[str], list[int]]:
    """The domain's test texts and label ids (a seeded sample of ``max_texts`` when given), read from
    the domain's own test file with the pipeline's reader (CSV, JSON/JSONL or Parquet)."""
    from domainflow.catalog import get_domain
    from domainflow.data.tables import read_table
    from domainflow.spec import ClassificationSpec

    spec = get_domain(domain).as_kind(ClassificationSpec)
    frame = read_table(spec.source.resolve()["test"])
    texts = [str(t) for t in frame[spec.text_column]]
    indices = [spec.label_index(v) for v in frame[spec.label_column]]
    labels = [index for index in indices if index is not None]
    if len(labels) != len(indices):
        raise SystemExit(f"{domain}: the test file has labels the domain does not know")
    rows = list(zip(texts, labels, strict=True))
    if max_texts is not None and max_texts < len(rows):
        rows = random.Random(seed).sample(rows, max_texts)
    return [t for t, _ in rows], [y for _, y in rows]


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first paragraph as the description, the rest kept for --help."""
    return argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )


def ingest_and_probe(
    spec: Any, model: str | None, work: Path, *, max_train_samples: int | None, epochs: float | None, seed: int
) -> tuple[Any, Any, Any]:
    """The domain's data ingested by the pipeline's own code (a stratified training slice when asked), its training
    recipe, and the linear probe every trained candidate starts from: ``(DatasetRef, TrainConfig, ModelRef)``."""
    from domainflow.data.dataset import ingest_dataset
    from tasks.finetune import make_train_config, train_linear_probe

    files = spec.source.resolve()
    dataset = ingest_dataset(
        spec.data_slice(),
        spec.name,
        work / "dataset",
        train_path=files["train"],
        test_path=files["test"],
        max_train_samples=max_train_samples,
        seed=seed,
    )
    print(f"{spec.name}: {dataset.num_rows}", flush=True)
    config = make_train_config(spec, model, epochs=epochs, seed=seed)
    return dataset, config, train_linear_probe(dataset, config, work / "probe")
