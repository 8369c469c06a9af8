"""Fine-tune stage of a ranking domain: baselines, the two-tower text model, and the ranker.

* :func:`train_baselines` — popularity counts and BPR on the train split; BPR's epoch is chosen
  by validation NDCG@10 (never test).
* :func:`finetune_two_tower` — the MiniLM encoder trained with in-batch negatives on
  (history, next positive) pairs from the *base* train split (see
  :mod:`domainflow.recsys.dataset`: it stops before each user's fit target).
* :func:`build_item_tables` — the ``two_tower`` candidate: a bundle whose item embeddings are
  precomputed by the trained item tower, with the per-item tables the ranker reads (popularity,
  BPR factors and co-occurrence, all from the base split, BPR with the baseline's chosen epochs).
* :func:`fit_ranker` — the ``ranker`` candidate: the same bundle plus a conditional logit fitted
  on each user's fit target against ``ranker_negatives`` sampled items. Its features come from
  loading the ``two_tower`` bundle, the code path that serves.

Cold-start protocol (``spec.split_protocol == "cold_start"``): the cold items are absent from
train, so from every table built from it; in addition BPR draws its negatives from warm items only
(:func:`negative_pool`), the ranker's sampled negatives are warm items (:func:`fit_groups`), and the
ranker's fit rows treat a popularity-stratified share of warm items as cold (their collaborative
features zeroed, the ``cold`` flag set: the "item dropout" of DropoutNet, Volkovs et al. 2017), so
that it learns how far to trust the text score where nothing else is known, instead of learning
only that a cold item is never the target.

Each task writes into ``<target>.partial`` and renames, so a crash never leaves a folder that
looks finished; outputs are content-addressed by their inputs and code.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from pydantic import BaseModel

from domainflow import settings
from domainflow.atomic import build_atomically
from domainflow.fingerprint import path_fingerprint
from domainflow.footprint import training_section
from domainflow.logs import run_logger
from domainflow.modeling import load_encoder, resolve_base_model
from domainflow.records import ModelRef
from domainflow.recsys import baselines as bl
from domainflow.recsys.bundle import Recommender, write_bundle
from domainflow.recsys.dataset import RankingData, StageRows
from domainflow.recsys.features import (
    TRANSITION_DECAY,
    TRANSITION_WINDOW,
    ItemTables,
    cooccurrence_cosine,
    feature_names,
    genre_matrix,
    history_features,
    parse_years,
    transition_probabilities,
)
from domainflow.recsys.protocol import choose_cold_items, ranking_metrics, target_ranks
from domainflow.recsys.ranker import fit_ranker as fit_conditional_logit
from domainflow.recsys.ranker import sample_groups
from domainflow.recsys.records import BaselinesRef, RankingDatasetRef
from domainflow.recsys.spec import RankingSpec
from domainflow.recsys.two_tower import Pair, TwoTower, encode, train_two_tower, training_pairs
from tasks.caching import CODE_AND_INPUTS, require_shared, step_dir

TWO_TOWER = "two_tower"
RANKER = "ranker"


class TwoTowerConfig(BaseModel):
    """Every knob that changes the text model or the ranker; part of the cache key and the lineage."""

    base_model: str
    base_fingerprint: str
    num_layers: int | None = None
    epochs: float = 1.0
    batch_size: int = 64
    learning_rate: float = 5e-5
    temperature: float = 0.05
    max_pairs: int = 4000
    pairs_per_user: int = 6
    warmup_ratio: float = 0.1
    history_max_length: int = 64
    item_max_length: int = 48
    ranker_negatives: int = 30
    seed: int = 42


def make_two_tower_config(
    spec: RankingSpec,
    model: str | None,
    *,
    epochs: float | None = None,
    seed: int = 42,
    num_layers: int | None = None,
    max_pairs: int | None = None,
) -> TwoTowerConfig:
    """The domain's two-tower defaults, overridden by the user's choices."""
    base = resolve_base_model(model or spec.default_model)
    recipe = spec.two_tower.model_dump()
    if epochs is not None:
        recipe["epochs"] = epochs
    if max_pairs is not None:
        recipe["max_pairs"] = max_pairs
    return TwoTowerConfig(
        base_model=base,
        base_fingerprint=path_fingerprint(base) if Path(base).exists() else base,
        num_layers=num_layers,
        history_max_length=spec.history_max_length,
        item_max_length=spec.item_max_length,
        ranker_negatives=spec.ranker_negatives,
        seed=seed,
        **recipe,
    )


def _out_dir(domain: str, kind: str, name: str, task_fn: Any, *inputs: Any) -> Path:
    """A step's folder, named by its code and inputs (see ``tasks.caching.step_dir``)."""
    return step_dir(settings.runs_dir() / domain / kind, name, task_fn, *inputs)


def _publish(target: Path, build: Callable[[Path], Any]) -> Any:
    """Build in a private folder and rename it into place when complete (``domainflow.atomic``)."""
    return build_atomically(target, build)


# ------------------------------------------------------------------------------- baselines


def positives_of(data: RankingData, frame) -> tuple[np.ndarray, np.ndarray]:
    """(user position, item position) of the positive interactions in ``frame``."""
    positives = frame[frame["positive"].to_numpy(dtype=bool)]
    return positives["user_id"].map(data.index.user_pos).to_numpy(), positives["item_id"].map(
        data.index.item_pos
    ).to_numpy()


def negative_pool(data: RankingData) -> np.ndarray | None:
    """Item positions BPR may draw negatives from: every item, or (cold start) the warm items only."""
    return np.flatnonzero(~data.cold_mask) if data.cold_mask.any() else None


def fit_baselines(data: RankingData, spec: Any, seed: int, out_dir: Path) -> BaselinesRef:
    """Popularity and BPR on the train split, saved as ``baselines.safetensors`` + ``baselines.json``."""
    from safetensors.numpy import save_file

    users, items = positives_of(data, data.train)
    num_users, num_items = len(data.index.users), len(data.index.items)
    started = time.perf_counter()
    popularity = bl.popularity_scores(items, num_items)
    popularity_seconds = time.perf_counter() - started

    valid = data.stage("valid")

    def validate(user_factors: np.ndarray, item_factors: np.ndarray, bias: np.ndarray) -> float:
        scores = user_factors[valid.users] @ item_factors.T + bias
        return ranking_metrics(target_ranks(scores, valid.targets, valid.excluded), ("ndcg_at_10",))["ndcg_at_10"]

    recipe = spec.bpr
    started = time.perf_counter()
    bpr = bl.train_bpr(
        users,
        items,
        num_users,
        num_items,
        dim=recipe.dim,
        epochs=recipe.epochs,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        batch_size=recipe.batch_size,
        seed=seed,
        validate=validate,
        eval_every=recipe.eval_every,
        negative_pool=negative_pool(data),
    )
    bpr_seconds = time.perf_counter() - started
    save_file(
        {
            "popularity": popularity.astype(np.float32),
            "bpr_users": bpr.user_factors,
            "bpr_items": bpr.item_factors,
            "bpr_bias": bpr.item_bias,
        },
        str(out_dir / "baselines.safetensors"),
    )
    info = {
        "bpr_best_epoch": bpr.best_epoch,
        "bpr_valid_curve": bpr.curve,
        "train_seconds": {"popularity": popularity_seconds, "bpr": bpr_seconds},
    }
    (out_dir / "baselines.json").write_text(json.dumps(info, indent=2))
    return BaselinesRef(path=str(out_dir), fingerprint=path_fingerprint(out_dir), **info)


@task(name="train-baselines", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def train_baselines(spec: RankingSpec, dataset: RankingDatasetRef, seed: int = 42) -> BaselinesRef:
    """Popularity and BPR (epochs chosen on validation)."""
    require_shared(dataset)
    log = run_logger(__name__)
    target = _out_dir(
        dataset.domain, "baselines", "popularity-bpr", train_baselines, dataset.fingerprint, spec.bpr, seed
    )
    ref = _publish(target, lambda out: fit_baselines(RankingData.load(dataset.path), spec, seed, out))
    ref = ref.model_copy(update={"path": str(target), "fingerprint": path_fingerprint(target)})
    log.info(
        "baselines: BPR best epoch %d (validation NDCG@10 curve %s), %.1f s",
        ref.bpr_best_epoch,
        ref.bpr_valid_curve,
        ref.train_seconds["bpr"],
    )
    return ref


# ------------------------------------------------------------------------------- two-tower


def text_pairs(data: RankingData, spec: Any, config: TwoTowerConfig) -> list[Pair]:
    """The two-tower's (history text, next positive item) pairs, from the base split."""
    base = data.base_train()
    histories = data.histories_from(base)
    flags: list[list[bool]] = [[] for _ in data.index.users]
    for u, positive in zip(
        base["user_id"].map(data.index.user_pos).to_numpy(), base["positive"].to_numpy(dtype=bool), strict=True
    ):
        flags[u].append(bool(positive))
    return training_pairs(
        histories,
        flags,
        data.item_texts,
        spec.history_text,
        pairs_per_user=config.pairs_per_user,
        max_pairs=config.max_pairs,
        seed=config.seed,
    )


def train_text_model(data: RankingData, spec: Any, config: TwoTowerConfig, out_dir: Path, log: Any) -> ModelRef:
    """Fine-tune the encoder on base-train pairs; save it (safetensors) with its loss curve."""
    torch.manual_seed(config.seed)
    encoder, tokenizer = load_encoder(config.base_model, num_layers=config.num_layers)
    model = TwoTower(encoder)
    pairs = text_pairs(data, spec, config)
    log.info("two-tower: %d training pairs, %g epoch(s) of batches of %d", len(pairs), config.epochs, config.batch_size)
    with training_section():  # one training loop at a time in a process (domainflow.footprint)
        result = train_two_tower(
            model,
            tokenizer,
            pairs,
            data.item_texts,
            epochs=config.epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            temperature=config.temperature,
            warmup_ratio=config.warmup_ratio,
            history_max_length=config.history_max_length,
            item_max_length=config.item_max_length,
            seed=config.seed,
            log=log,
        )
    encoder.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(
        json.dumps(
            {
                "pairs": len(pairs),
                "steps": result.steps,
                "seconds": result.seconds,
                "losses": result.losses,
                "config": config.model_dump(),
            },
            indent=2,
        )
    )
    return ModelRef(
        name="two_tower_encoder", path=str(out_dir), fingerprint=path_fingerprint(out_dir), train_seconds=result.seconds
    )


@task(name="finetune-two-tower", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def finetune_two_tower(spec: RankingSpec, dataset: RankingDatasetRef, config: TwoTowerConfig) -> ModelRef:
    """The trained encoder directory (both towers)."""
    require_shared(dataset)
    log = run_logger(__name__)
    target = _out_dir(
        dataset.domain,
        "models",
        "two_tower_encoder",
        finetune_two_tower,
        dataset.fingerprint,
        config,
        spec.history_items,
    )
    ref = _publish(target, lambda out: train_text_model(RankingData.load(dataset.path), spec, config, out, log))
    return ref.model_copy(update={"path": str(target), "fingerprint": path_fingerprint(target)})


# --------------------------------------------------------------------- tables and the ranker


def item_tables(data: RankingData, spec: Any, encoder_dir: Path, config: TwoTowerConfig, bpr_epochs: int) -> ItemTables:
    """Per-item arrays from the base split (what the ranker's features read)."""
    base = data.base_train()
    num_users, num_items = len(data.index.users), len(data.index.items)
    users, items = positives_of(data, base)
    recipe = spec.bpr
    bpr = bl.train_bpr(
        users,
        items,
        num_users,
        num_items,
        dim=recipe.dim,
        epochs=bpr_epochs,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        batch_size=recipe.batch_size,
        seed=config.seed,
        negative_pool=negative_pool(data),
    )
    all_users = base["user_id"].map(data.index.user_pos).to_numpy()
    all_items = base["item_id"].map(data.index.item_pos).to_numpy()
    histories = data.histories_from(base)
    encoder, tokenizer = load_encoder(str(encoder_dir))
    embeddings = encode(TwoTower(encoder), tokenizer, data.item_texts, config.item_max_length)
    return ItemTables(
        item_embeddings=embeddings,
        popularity=bl.popularity_scores(items, num_items),
        bpr_items=bpr.item_factors,
        bpr_bias=bpr.item_bias,
        cooccurrence=cooccurrence_cosine(all_users, all_items, num_users, num_items, spec.item_neighbours),
        genres=genre_matrix(data.items["genres"].tolist())[0],
        years=parse_years(data.items["year"].tolist()),
        fold_in_reg=spec.bpr.fold_in_reg,
        cold=data.cold_mask.astype(np.float32),
        transitions=transition_probabilities(
            histories, num_items, TRANSITION_WINDOW, TRANSITION_DECAY, spec.item_neighbours
        ),
        successors=transition_probabilities(histories, num_items, neighbours=spec.item_neighbours),
    )


def catalogue(data: RankingData) -> dict[str, list[str]]:
    return {"item_id": data.items["item_id"].tolist(), "title": data.items["title"].tolist(), "text": data.item_texts}


@task(name="build-item-tables", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def build_item_tables(
    spec: RankingSpec, dataset: RankingDatasetRef, encoder: ModelRef, baselines: BaselinesRef, config: TwoTowerConfig
) -> ModelRef:
    """The ``two_tower`` candidate bundle: precomputed item embeddings + the ranker's item tables."""
    require_shared(dataset, encoder, baselines)
    target = _out_dir(
        dataset.domain,
        "models",
        TWO_TOWER,
        build_item_tables,
        dataset.fingerprint,
        encoder.fingerprint,
        baselines.bpr_best_epoch,
        config,
        spec,
    )

    def build(out: Path) -> None:
        data = RankingData.load(dataset.path)
        tables = item_tables(data, spec, Path(encoder.path), config, baselines.bpr_best_epoch)
        lengths = {
            "history_max_length": config.history_max_length,
            "item_max_length": config.item_max_length,
            "history_items": spec.history_items,
        }
        write_bundle(
            out,
            encoder_dir=Path(encoder.path),
            items=catalogue(data),
            tables=tables,
            scorer="text",
            text_lengths=lengths,
            extra={"protocol": spec.protocol, "dataset_fingerprint": dataset.fingerprint},
        )

    started = time.perf_counter()
    _publish(target, build)
    return ModelRef(
        name=TWO_TOWER,
        path=str(target),
        fingerprint=path_fingerprint(target),
        train_seconds=encoder.train_seconds + time.perf_counter() - started,
    )


def fit_groups(data: RankingData, negatives: int, seed: int) -> tuple[StageRows, np.ndarray]:
    """The ``fit`` stage and its groups (target, then ``negatives`` sampled unseen items; under cold
    start warm items only: a cold item is in no training table, the ranker's rows included)."""
    rows = data.stage("fit")
    return rows, sample_groups(rows.excluded | data.cold_mask[None, :], rows.targets, negatives, seed)


def simulated_cold(data: RankingData, spec: Any, seed: int) -> np.ndarray:
    """Warm item positions the cold-start ranker's fit rows treat as cold: the protocol's share, drawn
    per popularity stratum of the base split (as the real cold items were), seeded."""
    warm = np.flatnonzero(~data.cold_mask)
    base = data.base_train()
    positives = base.loc[base["positive"].to_numpy(dtype=bool), "item_id"]
    chosen = choose_cold_items([data.index.items[i] for i in warm], positives, spec.cold_item_share, seed)
    return np.array([data.index.item_pos[item] for item in chosen], dtype=np.int64)


def fit_features(
    data: RankingData, recommender: Recommender, negatives: int, seed: int, spec: Any = None
) -> np.ndarray:
    """rows x (target + negatives) x features at the ``fit`` stage (histories from the base split)."""
    cold_start = bool(spec is not None and spec.cold_start)
    rows, groups = fit_groups(data, negatives, seed)
    tables = recommender.tables.with_cold(simulated_cold(data, spec, seed)) if cold_start else recommender.tables
    names = feature_names(cold_start)
    embeddings = recommender.user_embeddings(rows.histories)
    return np.stack(
        [
            history_features(tables, history, embedding, group, names)
            for history, embedding, group in zip(rows.histories, embeddings, groups, strict=True)
        ]
    )


@task(name="fit-ranker", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def fit_ranker(spec: RankingSpec, dataset: RankingDatasetRef, two_tower: ModelRef, config: TwoTowerConfig) -> ModelRef:
    """The ``ranker`` candidate: the ``two_tower`` bundle plus a conditional logit over its features."""
    require_shared(dataset, two_tower)
    log = run_logger(__name__)
    target = _out_dir(
        dataset.domain,
        "models",
        RANKER,
        fit_ranker,
        dataset.fingerprint,
        two_tower.fingerprint,
        config.ranker_negatives,
        config.seed,
        spec.history_items,
        spec.split_protocol,
        spec.cold_item_share,
    )

    def build(out: Path) -> None:
        data = RankingData.load(dataset.path)
        recommender = Recommender(Path(two_tower.path), spec.history_text)
        names = feature_names(spec.cold_start)
        features = fit_features(data, recommender, config.ranker_negatives, config.seed, spec)
        ranker = fit_conditional_logit(features, names)
        log.info(
            "ranker weights (standardised features): %s",
            {n: round(float(w), 3) for n, w in zip(names, ranker.weights, strict=True)},
        )
        shutil.copytree(two_tower.path, out, dirs_exist_ok=True)
        ranker.save(out / "ranker.json")
        metadata = json.loads((out / "recommender.json").read_text())
        metadata.update(scorer=RANKER, ranker_negatives=config.ranker_negatives, features=list(names))
        (out / "recommender.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))

    started = time.perf_counter()
    _publish(target, build)
    return ModelRef(
        name=RANKER,
        path=str(target),
        fingerprint=path_fingerprint(target),
        parent=None,
        train_seconds=two_tower.train_seconds + time.perf_counter() - started,
    )
