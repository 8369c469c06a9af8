"""Ingest for ranking domains: interactions + items files → validated, split dataset folder.

The files are checked by :func:`domainflow.recsys.data.validate` (every problem reported with its
file and row before anything trains), optionally reduced to a seeded sample of users (quick
runs), split by the domain's protocol (:func:`domainflow.recsys.protocol.leave_last_out`) and
written with the item texts the item tower reads. The folder is named by a fingerprint of the
source bytes, the recipe and the code of this module with everything it imports (so two code
versions never share a folder), and published with :func:`domainflow.atomic.build_atomically`:
a folder that exists is complete, and two runs building it at once do not clobber each other.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact

from domainflow import settings
from domainflow.atomic import build_atomically
from domainflow.fingerprint import value_fingerprint
from domainflow.logs import run_logger
from domainflow.recsys.data import RankingDataError, validate
from domainflow.recsys.dataset import RankingData, sample_users, write_dataset
from domainflow.recsys.protocol import choose_cold_items, cold_start, leave_last_out, mark_positive
from domainflow.recsys.records import RankingDatasetRef
from domainflow.recsys.spec import RankingSpec
from tasks.artifacts import artifact_key
from tasks.caching import CODE_AND_INPUTS, code_fingerprint, require_shared


def frame_digest(*frames: pd.DataFrame) -> str:
    """Content hash of frames (values and column names, not the index)."""
    digest = hashlib.sha256()
    for frame in frames:
        digest.update(",".join(map(str, frame.columns)).encode())
        digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def ingest_ranking(
    spec: RankingSpec, files: dict[str, str], out_dir: Path, *, fingerprint: str, max_users: int | None, seed: int
) -> RankingDatasetRef:
    """Read, validate, sample, split and write; returns the record (``path`` = ``out_dir``)."""
    domain = spec.name
    interactions, items, sources = spec.read_source({k: Path(v) for k, v in files.items()})
    clean, clean_items, repairs = validate(interactions, items, sources)
    clean = sample_users(clean, max_users, seed)
    catalogue = clean_items["item_id"].tolist()
    split = leave_last_out(clean, spec.positive_threshold, spec.min_positives, catalogue=catalogue)
    if spec.cold_start:
        positives = clean.loc[mark_positive(clean, spec.positive_threshold).to_numpy(), "item_id"]
        split = cold_start(split, choose_cold_items(catalogue, positives, spec.cold_item_share, spec.cold_seed))
    if split.holdout.empty:
        raise RankingDataError(
            f"{sources['interactions']}: no user has {spec.min_positives} positive interactions, "
            f"so nobody can be evaluated"
        )
    item_fields = zip(clean_items["title"], clean_items["year"], clean_items["genres"], strict=True)
    clean_items["text"] = [spec.item_text(title, year, genres) for title, year, genres in item_fields]
    cold = set(split.cold_items)
    cold_targets = {stage: int(split.holdout[f"{stage}_item"].isin(cold).sum()) for stage in ("valid", "test")}
    report = {
        "sources": sources,
        "repairs": repairs,
        "max_users": max_users,
        "seed": seed,
        "protocol": spec.protocol,
        "users": int(clean["user_id"].nunique()),
        "items": len(clean_items),
        "interactions": len(clean),
        "positives": int(split.train["positive"].sum()) + 2 * len(split.holdout),
        "evaluated_users": len(split.holdout),
        "split_protocol": spec.split_protocol,
        "cold_items": len(split.cold_items),
        "cold_targets": cold_targets,
    }
    write_dataset(out_dir, clean_items, split, report)
    data = RankingData.load(out_dir)
    return RankingDatasetRef(
        domain=domain,
        path=str(out_dir),
        fingerprint=fingerprint,
        test_fingerprint=frame_digest(data.train, data.holdout, data.items[["item_id"]]),
        num_users=report["users"],
        num_items=report["items"],
        num_interactions=report["interactions"],
        evaluated_users=report["evaluated_users"],
        fit_users=len(data.fit_targets),
        cold_items=len(cold),
    )


def summary_markdown(ref: RankingDatasetRef, report: dict) -> str:
    sources = ", ".join(f"{k} `{v}`" for k, v in report["sources"].items())
    return (
        "\n".join(
            [
                f"# Dataset: {ref.domain}",
                "",
                f"- {ref.num_users} users, {ref.num_items} items, {ref.num_interactions} interactions "
                f"({report['positives']} positives)",
                f"- evaluated users: {ref.evaluated_users}; ranker fit users: {ref.fit_users}",
                f"- split protocol: {report.get('split_protocol', 'standard')}; cold items: {ref.cold_items}, "
                f"cold targets: {report.get('cold_targets', {})}",
                f"- sources: {sources}; repairs: {report['repairs']}",
                f"- user sample: {report['max_users'] or 'all'} (seed {report['seed']}); "
                f"fingerprint `{ref.fingerprint}`, test `{ref.test_fingerprint}`",
                "",
                f"**Protocol.** {report['protocol']}",
            ]
        )
        + "\n"
    )


@task(name="ingest-interactions", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def ingest_interactions(
    spec: RankingSpec, files: dict[str, str], source_fingerprint: str, max_users: int | None = None, seed: int = 42
) -> RankingDatasetRef:
    """Validated, split dataset folder under ``runs/<domain>/datasets/`` (content-addressed; the spec's
    protocol knobs and item-text rules are in the key)."""
    require_shared(list(files.values()))
    log = run_logger(__name__)
    domain = spec.name
    fingerprint = value_fingerprint(
        source_fingerprint,
        max_users,
        seed,
        code_fingerprint(__name__),
        spec.model_dump(mode="json", exclude={"description"}),
    )
    target = settings.runs_dir() / domain / "datasets" / f"ranking-{fingerprint}"

    def build(folder: Path) -> RankingDatasetRef:
        return ingest_ranking(spec, files, folder, fingerprint=fingerprint, max_users=max_users, seed=seed)

    # The record names the private folder it was built in; point it at the published one.
    ref = build_atomically(target, build).model_copy(update={"path": str(target)})
    report = json.loads((target / "report.json").read_text())
    log.info(
        "%s: %d users, %d items, %d interactions; %d evaluated",
        domain,
        ref.num_users,
        ref.num_items,
        ref.num_interactions,
        ref.evaluated_users,
    )
    create_markdown_artifact(
        markdown=summary_markdown(ref, report),
        key=artifact_key(domain, "dataset"),
        description=f"{domain} dataset and protocol",
    )
    return ref
