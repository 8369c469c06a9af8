"""Scheduled retraining: the domain pipeline on the newest training file in the domain's data folder.

``domainflow schedule`` serves this flow as one Prefect deployment per domain, on a cron
schedule. Each run looks at the domain's data folder (the folder of the spec's train file, or
``data_dir``) and trains on the **newest** ``train*`` file (CSV, JSON/JSONL or Parquet; by
modification time, then name), tested on the domain's own test file, through the same
``domain_pipeline`` and so behind the same gates: floors, champion comparison on the same test
set, a tie keeps the champion. A worse model is recorded as a rejection and never served.

Why the newest file and not all of them concatenated: a data drop is taken to be a complete
snapshot. That keeps every run reproducible from one file (its lineage names the file and its
fingerprint), lets the data owner *remove* bad rows (concatenation can only add them), and
keeps the ingest step's errors pointing at a real file and line. Accumulating data means
dropping the accumulated file. Why the test file stays fixed: the gate compares challenger and
champion on the same yardstick; a new test file is a deliberate change of ``data_dir``.

A run with no new data costs little: every pipeline step is cached on content fingerprints,
and the gate sees a tie and keeps the champion. Write drops atomically (copy to
``.train-new.csv``, then rename): hidden files and ``*.tmp`` / ``*.part`` are never picked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from domainflow.catalog import add_domain_modules, get_domain
from tasks.artifacts import artifact_key

TRAIN_GLOB = "train*"
DATA_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


def import_domain_modules(modules: Sequence[str] | None) -> None:
    """Make domains defined in Python modules known (kept outside the package, e.g. private ones).

    A scheduled run executes in a fresh process started by the Prefect runner; the modules are
    recorded in its environment and imported now, so a missing one fails here, by name.
    """
    if modules:
        add_domain_modules(modules)


def domain_data_folder(domain: str, data_dir: str | Path | None = None) -> Path:
    """The folder holding the domain's train file (``data_dir`` when given)."""
    return get_domain(domain).source.resolve(data_dir)["train"].parent


def training_files(folder: Path) -> list[Path]:
    """Candidate training files in ``folder``, newest first (modification time, then name)."""
    files = [
        p
        for p in Path(folder).glob(TRAIN_GLOB)
        if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and not p.name.startswith(".")
    ]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def pick_data_files(domain: str, data_dir: str | Path | None = None) -> tuple[Path, Path, list[Path]]:
    """(newest training file, the domain's test file, the older training files left aside)."""
    resolved = get_domain(domain).source.resolve(data_dir)
    folder = resolved["train"].parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{domain}: data folder {folder} does not exist")
    candidates = training_files(folder)
    if not candidates:
        raise FileNotFoundError(
            f"{domain}: no training file ({TRAIN_GLOB} with suffix {', '.join(DATA_SUFFIXES)}) in {folder}"
        )
    return candidates[0], resolved["test"], candidates[1:]


@flow(name="retrain", log_prints=True)
def retrain(
    domain: str = "customer_service",
    data_dir: str | None = None,
    model: str | None = None,
    epochs: float | None = None,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    num_layers: int | None = None,
    seed: int = 42,
    domain_modules: list[str] | None = None,
) -> dict[str, Any]:
    """Retrain ``domain`` on the newest training file in its data folder; the gates decide on promotion.

    Args:
        domain: a registered domain, or the absolute path of a domain file.
        data_dir: the domain's data folder (default: the folder of the spec's train file).
        model / epochs / max_train_samples / max_test_samples / num_layers / seed: as for
            ``domain_pipeline`` (defaults: the domain's).
        domain_modules: modules to import first, for domains registered outside ``domains/``.
    """
    from flows.pipeline import domain_pipeline  # here, so the file-picking helpers work without the ML stack

    import_domain_modules(domain_modules)
    name = get_domain(domain).name  # ``domain`` may be a domain file's path

    log = get_run_logger()
    train_file, test_file, older = pick_data_files(domain, data_dir)
    log.info("%s: training on %s (newest of %d), testing on %s", domain, train_file, len(older) + 1, test_file)
    ignored = "".join(f"\n- `{p.name}`" for p in older[:20]) or "\n- none"
    create_markdown_artifact(
        f"## {name}: retraining data\n\nTrain: `{train_file}`\n\nTest: `{test_file}`\n\nOlder training files left "
        f"aside:{ignored}",
        key=artifact_key(name, "retrain-data"),
        description="Which data file this scheduled retraining used",
    )
    summary = domain_pipeline(
        domain=domain,
        model=model,
        train_file=str(train_file),
        test_file=str(test_file),
        max_train_samples=max_train_samples,
        max_test_samples=max_test_samples,
        epochs=epochs,
        num_layers=num_layers,
        seed=seed,
    )
    decision = summary["decision"]
    log.info("%s: %s", domain, decision["summary"])
    return {
        "domain": domain,
        "train_file": str(train_file),
        "test_file": str(test_file),
        "promoted": bool(decision.get("promote")),
        "version": summary.get("version"),
        "summary": decision.get("summary", ""),
    }
