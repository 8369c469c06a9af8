"""Peers on exactly our split: RecBole's Pop, ItemKNN, BPR, GRU4Rec and SASRec beside domainflow's ranker.

    .venv/bin/pip install -e ".[recsys-peers]"          # recbole==1.2.1 (+ colorlog, texttable, tabulate)
    .venv/bin/domainflow run recommendation              # the ranker and the split it was evaluated on
    .venv/bin/python benchmarks/recsys_peers.py [--seeds 0 1 2] [--max-epochs 60] [--quick]

The split is the one the pipeline ingested (``runs/recommendation/datasets/ranking-<fingerprint>``,
found through the ranker bundle's ``dataset_fingerprint``), exported to RecBole's pre-split
benchmark files (:mod:`domainflow.recsys.atomic_export`): RecBole trains on our train split and
early-stops on our validation items. Every model is then scored *by us*: its full score matrix
over the catalogue for our evaluated users, ranked with our masks
(:func:`domainflow.recsys.protocol.target_ranks`), so every row of the table uses the same
candidates, the same tie rule and the same per-user ranks. For the general models the script also
checks that RecBole's own full-ranking masks equal ours (same users, targets, excluded items).

Choices, all on validation (test is read once per reported number): a small grid per model
(seed 0), then the chosen setting retrained with each seed and scored on test. The table shows the
mean over seeds of HR@10 / NDCG@10 / MRR with a 95% bootstrap interval over users (of the
per-user metric averaged over seeds), and the ranker's paired difference with each peer.

Peers read what RecBole's models read: general models the user's train interactions (ItemKNN's
test scores add the validation item to the history, as its similarity matrix allows; BPR keeps its
trained user factors, RecBole's convention), sequential models the history before the target
(at test: train + validation item, truncated to ``MAX_ITEM_LIST_LENGTH`` = 50). All train on every
train interaction whatever its rating (RecBole's implicit-feedback convention); targets are
positives (rating >= 4).

Compatibility with torch 2.13 / numpy 2.4 (RecBole 1.2.1 dates from 2023), shimmed here without
touching the models: (1) ``Config`` calls ``np.float_``, ``np.complex_`` and ``np.unicode_``, removed in
numpy 2.0 (AttributeError), so those three aliases are restored before RecBole is imported; (2)
RecBole keeps its best epoch as a checkpoint that pickles its config, which ``torch.load`` refuses since
torch 2.6 (``weights_only=True``) and which this project never unpickles, so the trainer's checkpoint hook
keeps the best epoch's weights in memory instead; (3) pandas 3 made ``Series.agg(len)`` return the Series'
length instead of each element's, which breaks RecBole's ``token_seq`` fields (the sequential models' input lists), so
``agg(len)`` is mapped element-wise while RecBole builds its dataset (:func:`elementwise_len_agg`).
``thop``, ``plotly`` and ``ray`` are only imported by RecBole's FLOPs counter and hyper-parameter
tuning, which this script does not use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from domainflow import settings  # noqa: E402
from domainflow.recsys import atomic_export  # noqa: E402
from domainflow.recsys.bootstrap import METRICS, bootstrap_mean, per_user  # noqa: E402
from domainflow.recsys.dataset import RankingData, StageRows  # noqa: E402
from domainflow.recsys.protocol import target_ranks  # noqa: E402

NAME = "split"
MAX_LENGTH = 50
PEERS = ("Pop", "ItemKNN", "BPR", "GRU4Rec", "SASRec")
SEQUENTIAL = {"GRU4Rec", "SASRec"}
RANKER = "domainflow ranker"
SPLIT_FILES = ("train.parquet", "holdout.parquet")  # what a split is (items.parquet may gain columns)
# Small grids (chosen on validation NDCG@10, seed 0). Everything else is RecBole's default for the model.
GRIDS: dict[str, list[dict[str, Any]]] = {
    "Pop": [{}],
    "ItemKNN": [{"k": k, "shrink": 0.0} for k in (20, 50, 100, 200)],
    "BPR": [{"embedding_size": 64, "learning_rate": lr} for lr in (1e-3, 5e-3)],
    "GRU4Rec": [
        {"embedding_size": 64, "hidden_size": 128, "learning_rate": 1e-3, "dropout_prob": p, "loss_type": "CE"}
        for p in (0.2, 0.4)
    ],
    "SASRec": [
        {
            "hidden_size": 64,
            "inner_size": 256,
            "n_layers": 2,
            "n_heads": 2,
            "learning_rate": 1e-3,
            "loss_type": "CE",
            "hidden_dropout_prob": p,
            "attn_dropout_prob": p,
        }
        for p in (0.2, 0.5)
    ],
}


@contextmanager
def elementwise_len_agg() -> Iterator[None]:
    """pandas 3 made ``Series.agg(len)`` the length of the Series (pandas 2: each element's length),
    which breaks RecBole's handling of ``token_seq`` fields (``item_id_list``: "Length of values (1)
    does not match length of index"). While RecBole builds a dataset, ``agg(len)`` maps element-wise."""
    import pandas as pd

    series: Any = pd.Series  # patched on the class: RecBole calls it on its own Series
    original = series.agg

    def agg(self: pd.Series, func: Any = None, *args: Any, **kwargs: Any) -> Any:
        if func is len:
            return self.map(len)
        return original(self, func, *args, **kwargs)

    series.agg = agg
    try:
        yield
    finally:
        series.agg = original


def numpy_aliases() -> None:
    """RecBole 1.2.1's ``Config.compatibility_settings`` reads aliases numpy 2 removed; restore them."""
    for alias, target in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if not hasattr(np, alias):
            setattr(np, alias, target)


# ------------------------------------------------------------------------------------- our side


def find_ranker(domain: str, ranker: str | None) -> tuple[Path, Path]:
    """The ranker bundle (given, else the newest full-data one) and the dataset folder it was built on."""
    runs = settings.runs_dir() / domain
    if ranker:
        bundles = [Path(ranker)]
    else:
        bundles = sorted((runs / "models").glob("ranker-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for bundle in bundles:
        metadata = json.loads((bundle / "recommender.json").read_text())
        if metadata.get("scorer") != "ranker" or metadata.get("compression"):
            continue
        dataset = runs / "datasets" / f"ranking-{metadata['dataset_fingerprint']}"
        report = json.loads((dataset / "report.json").read_text()) if dataset.is_dir() else {}
        if report and report.get("max_users") is None:
            return bundle, dataset
    raise SystemExit(f"no full-data ranker under {runs / 'models'}: run `domainflow run {domain}` first")


def ranker_ranks(bundle: Path, data: RankingData, spec: Any) -> dict[str, np.ndarray]:
    """The ranker's per-user ranks on both stages, loaded and scored as the pipeline evaluates it."""
    from domainflow.recsys.bundle import Recommender

    recommender = Recommender(bundle, spec.history_text)
    if recommender.item_ids != data.index.items:
        raise SystemExit(f"{bundle} was built for another catalogue than {data}")
    out = {}
    for stage in ("valid", "test"):
        rows = data.stage(stage)
        out[stage] = target_ranks(recommender.score_histories(rows.histories), rows.targets, rows.excluded)
    return out


# ------------------------------------------------------------------------------------- RecBole


@dataclass
class Run:
    """One trained peer: its setting, seed and per-user ranks on both stages."""

    model: str
    params: dict[str, Any]
    seed: int
    ranks: dict[str, np.ndarray]
    seconds: float


def recbole_config(model: str, folder: Path, params: dict[str, Any], seed: int, max_epochs: int, work: Path) -> Any:
    from recbole.config import Config

    sequential = model in SEQUENTIAL
    load = ["user_id", "item_id", "timestamp", *(["item_id_list"] if sequential else [])]
    config = {
        "data_path": str(folder.parent),
        "benchmark_filename": list(atomic_export.STAGE_FILES),
        "load_col": {"inter": load, "item": ["item_id"]},
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "MAX_ITEM_LIST_LENGTH": MAX_LENGTH,
        # Pre-split files give the input sequence as a column of its own; without this alias RecBole remaps it
        # with a vocabulary of its own, so a sequence's ids would not be the item ids the model scores.
        **({"alias_of_item_id": ["item_id_list"]} if sequential else {}),
        "eval_args": {"group_by": "user", "order": "TO", "split": {"RS": [0.8, 0.1, 0.1]}, "mode": "full"},
        "metrics": ["Hit", "NDCG", "MRR"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        "epochs": max_epochs,
        "stopping_step": 5,
        "eval_step": 1,
        "train_batch_size": 2048 if not sequential else 512,
        "eval_batch_size": 4096,
        "seed": seed,
        "reproducibility": True,
        "use_gpu": False,
        "device": "cpu",
        "show_progress": False,
        "checkpoint_dir": str(work / "checkpoints"),
        "log_wandb": False,
        "save_dataset": False,
        "save_dataloaders": False,
        "train_neg_sample_args": None
        if params.get("loss_type") == "CE"
        else {"distribution": "uniform", "sample_num": 1},
        **params,
    }
    return Config(model=model, dataset=folder.name, config_dict=config)


def internal_items(dataset: Any) -> np.ndarray:
    """Our item position of each RecBole internal item id (index 0 is RecBole's padding: -1)."""
    tokens = dataset.field2id_token["item_id"]
    return np.array([-1] + [int(token) for token in tokens[1:]])


def check_masks(eval_loader: Any, dataset: Any, ours: StageRows) -> None:
    """RecBole's full-ranking history mask and targets for each user must be ours."""
    user_tokens = dataset.field2id_token["user_id"]
    item_of = internal_items(dataset)
    for row, user in enumerate(ours.users):
        uid = int(dataset.field2token_id["user_id"][str(user)])
        history = set(item_of[eval_loader.uid2history_item[uid].numpy()].tolist())
        positive = item_of[eval_loader.uid2positive_item[uid].numpy()].tolist()
        if history != set(np.flatnonzero(ours.excluded[row]).tolist()) or positive != [int(ours.targets[row])]:
            raise AssertionError(f"RecBole's masks differ from ours for user {user_tokens[uid]}")


def check_sequences(eval_loader: Any, dataset: Any, ours: StageRows) -> None:
    """RecBole's input sequence and target for each evaluated user must be ours (the last
    :data:`MAX_LENGTH` items of the stage's history, in RecBole's item vocabulary)."""
    feat = eval_loader._dataset.inter_feat
    item_tokens, user_tokens = dataset.field2id_token["item_id"], dataset.field2id_token["user_id"]
    row_of = {int(user): row for row, user in enumerate(ours.users)}
    if len(feat) != len(row_of):
        raise AssertionError(f"RecBole evaluates {len(feat)} rows, we evaluate {len(row_of)} users")
    for index in range(len(feat)):
        row = row_of[int(user_tokens[int(feat["user_id"][index])])]
        length = int(feat["item_length"][index])
        sequence = [int(item_tokens[int(i)]) for i in feat["item_id_list"][index][:length]]
        target = int(item_tokens[int(feat["item_id"][index])])
        if sequence != ours.histories[row][-MAX_LENGTH:] or target != int(ours.targets[row]):
            raise AssertionError(f"RecBole's input sequence or target differs from ours for user {ours.users[row]}")


def score_matrix(model_name: str, model: Any, dataset: Any, rows: StageRows, num_items: int) -> np.ndarray:
    """users x our catalogue: the RecBole model's full-sort scores for our rows (histories at this stage)."""
    import torch
    from recbole.data.interaction import Interaction

    item_of = internal_items(dataset)
    token_id = dataset.field2token_id
    uids = torch.tensor([int(token_id["user_id"][str(u)]) for u in rows.users])
    if model_name in SEQUENTIAL:
        sequences = torch.zeros((len(rows.users), MAX_LENGTH), dtype=torch.long)
        lengths = torch.zeros(len(rows.users), dtype=torch.long)
        for row, history in enumerate(rows.histories):
            recent = [int(token_id["item_id"][str(i)]) for i in history[-MAX_LENGTH:]]
            sequences[row, : len(recent)] = torch.tensor(recent)
            lengths[row] = len(recent)
        interaction = Interaction({"user_id": uids, "item_id_list": sequences, "item_length": lengths})
    else:
        interaction = Interaction({"user_id": uids})
    model.eval()
    if model_name == "ItemKNN":  # the stage's whole history (at test: + validation item) times the similarity
        vectors = np.zeros((len(rows.users), model.w.shape[0]))
        for row, items in enumerate(rows.histories):
            vectors[row, [int(token_id["item_id"][str(i)]) for i in items]] = 1.0
        raw = np.asarray((model.w.T @ vectors.T).T)  # = history @ w, RecBole's pred_mat for item kNN
    else:
        with torch.no_grad():
            raw = model.full_sort_predict(interaction).reshape(len(rows.users), -1).double().numpy()
    scores = np.full((len(rows.users), num_items), -np.inf)
    scores[:, item_of[1:]] = raw[:, 1:]
    return scores


@dataclass
class Bench:
    """What every peer run shares: the exported files, our split and stages, the epoch cap, a work folder."""

    folders: dict[str, Path]
    data: RankingData
    stages: dict[str, StageRows]
    max_epochs: int
    work: Path
    log: Callable[[str], None]


def train_peer(model_name: str, params: dict[str, Any], seed: int, bench: Bench) -> Run:
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    folder = bench.folders["sequential" if model_name in SEQUENTIAL else "general"]
    config = recbole_config(model_name, folder, params, seed, bench.max_epochs, bench.work)
    stages = bench.stages
    init_seed(config["seed"], config["reproducibility"])
    logging.getLogger("recbole").setLevel(logging.WARNING)
    with elementwise_len_agg():
        dataset = create_dataset(config)
        train_data, valid_data, test_data = data_preparation(config, dataset)
    check = check_sequences if model_name in SEQUENTIAL else check_masks
    check(valid_data, dataset, stages["valid"])
    check(test_data, dataset, stages["test"])
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    # RecBole saves the best epoch as a pickled checkpoint (its config object included), which would have to be
    # read back with torch.load(weights_only=False); the best epoch's weights are kept in memory instead.
    best: dict[str, Any] = {}

    def keep_best(epoch: int, *_: Any, **__: Any) -> None:
        best["state_dict"] = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        best["other_parameter"] = model.other_parameter()

    trainer._save_checkpoint = keep_best
    started = time.perf_counter()
    validate_epoch = trainer._valid_epoch

    def valid_epoch_with_progress(*args: Any, **kwargs: Any) -> Any:
        # RecBole's per-epoch log is silenced (verbose=False prints its config too): one line per epoch instead.
        score, result = validate_epoch(*args, **kwargs)
        bench.log(
            f"    {model_name} seed {seed} epoch {len(trainer.train_loss_dict)}: RecBole valid NDCG@10 {score:.4f}, "
            f"{time.perf_counter() - started:.0f} s"
        )
        return score, result

    trainer._valid_epoch = valid_epoch_with_progress
    trainer.fit(train_data, valid_data, saved=True, show_progress=False, verbose=False)
    seconds = time.perf_counter() - started
    model.load_state_dict(best["state_dict"])
    model.load_other_parameter(best["other_parameter"])
    num_items = len(bench.data.index.items)
    ranks = {
        stage: target_ranks(score_matrix(model_name, model, dataset, rows, num_items), rows.targets, rows.excluded)
        for stage, rows in stages.items()
    }
    valid_ndcg = float(per_user(ranks["valid"], "ndcg_at_10").mean())
    bench.log(
        f"  {model_name} {params} seed {seed}: valid NDCG@10 {valid_ndcg:.4f} "
        f"(RecBole's own best valid {trainer.best_valid_score:.4f}), {seconds:.0f} s"
    )
    return Run(model_name, params, seed, ranks, seconds)


def grid_settings(model_name: str, point: int | None, first: int | None) -> list[dict[str, Any]]:
    """The settings of ``model_name``'s grid to train: the ``point``-th alone (1-based), or the first ``first``
    (all when None). A point past a model's grid is an error, not a silent skip: a model with a one-setting
    grid (Pop) only has point 1."""
    grid = GRIDS[model_name]
    if point is None:
        return grid[:first]
    if not 1 <= point <= len(grid):
        raise SystemExit(f"--grid-point {point}: {model_name}'s grid has {len(grid)} setting(s)")
    return [grid[point - 1]]


def run_peer(
    model_name: str, seeds: list[int], grid: list[dict[str, Any]], bench: Bench
) -> tuple[list[Run], dict[str, Any], list[dict[str, Any]]]:
    """Grid on validation with the first seed, then the chosen setting with every seed; also the grid record
    (each setting's first-seed validation NDCG@10, as :func:`chosen_setting` writes it)."""
    first = [train_peer(model_name, params, seeds[0], bench) for params in grid]
    valid = lambda run: float(per_user(run.ranks["valid"], "ndcg_at_10").mean())  # noqa: E731
    best = max(first, key=valid)
    deterministic = model_name in {"Pop", "ItemKNN"}
    runs = [best] + ([] if deterministic else [train_peer(model_name, best.params, s, bench) for s in seeds[1:]])
    record = [grid_point(run.params, bench.max_epochs, run.seed, valid(run)) for run in first]
    return runs, best.params, record


def grid_point(params: dict[str, Any], max_epochs: int, seed: int, valid_ndcg: float) -> dict[str, Any]:
    """One setting's line of a row's grid record: what it was and how its first-seed run scored on validation."""
    return {"params": params, "max_epochs": max_epochs, "seed": seed, "valid_ndcg": valid_ndcg}


# ------------------------------------------------------------------------------------- the table


def summarise(name: str, runs_ranks: list[np.ndarray], reference: list[np.ndarray] | None) -> dict[str, Any]:
    """Mean over seeds of each metric, with a bootstrap interval over users of the seed-averaged
    per-user metric; with ``reference`` (the ranker's ranks), the paired difference too."""
    row: dict[str, Any] = {"model": name, "seeds": len(runs_ranks)}
    for metric in METRICS:
        values = np.mean([per_user(r, metric) for r in runs_ranks], axis=0)
        row[metric] = bootstrap_mean(values)
        row[f"{metric}_seed_std"] = float(np.std([per_user(r, metric).mean() for r in runs_ranks]))
    if reference is not None:
        ours = np.mean([per_user(r, "ndcg_at_10") for r in reference], axis=0)
        theirs = np.mean([per_user(r, "ndcg_at_10") for r in runs_ranks], axis=0)
        row["ranker_minus"] = bootstrap_mean(ours - theirs)
    return row


def table_row(
    name: str,
    test_runs: list[np.ndarray],
    valid_ndcgs: list[float],
    reference: list[np.ndarray] | None,
    split: str,
    **facts: Any,
) -> dict[str, Any]:
    """One row of the table and of an ``--out`` file: :func:`summarise` of the runs, plus what
    :func:`combine` needs to pool it with other files' runs (each run's test ranks and validation
    NDCG@10, the split) and ``facts`` (a peer's params, seed numbers, run seconds, epoch cap)."""
    row = summarise(name, test_runs, reference)
    row.update(valid_ndcgs=list(valid_ndcgs), test_ranks=[np.asarray(r).tolist() for r in test_runs], split=split)
    return {**row, **facts}


def table(rows: list[dict[str, Any]]) -> str:
    def cell(interval: Any) -> str:
        return f"{interval.mean:.4f} [{interval.low:.4f}, {interval.high:.4f}]"

    lines = [
        "| model | seeds | HR@10 [95% CI] | NDCG@10 [95% CI] | MRR [95% CI] | valid NDCG@10 "
        "| ranker − model, NDCG@10 [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        difference = row.get("ranker_minus")
        lines.append(
            f"| {row['model']} | {row['seeds']} | {cell(row['hit_rate_at_10'])} | {cell(row['ndcg_at_10'])} | "
            f"{cell(row['mrr'])} | {np.mean(row['valid_ndcgs']):.4f} | "
            + (f"{difference.text()} ({difference.verdict})" if difference is not None else "–")
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # argparse directly, not benchmarks.common: opacus's wheel installs a top-level `benchmarks` package
    # into site-packages that shadows this folder's namespace package.
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--domain", default="recommendation")
    parser.add_argument("--ranker", default=None, help="ranker bundle folder (default: the newest full-data one)")
    parser.add_argument(
        "--dataset", default=None, help="a split dataset folder: peers only, no ranker row (smoke runs)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=60, help="most epochs (early stopping on validation, 5)")
    parser.add_argument("--models", nargs="+", default=list(PEERS), choices=PEERS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core CPU)")
    parser.add_argument(
        "--grid-points", type=int, default=None, help="try only the first N settings of each model's grid"
    )
    parser.add_argument(
        "--grid-point",
        type=int,
        default=None,
        metavar="K",
        help="train only the K-th setting (1-based) of each model's grid: one process per grid point; "
        "--combine then picks each model's setting on the first seed's validation NDCG@10",
    )
    parser.add_argument("--quick", action="store_true", help="first grid point only, 3 epochs (a smoke run)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="JSON",
        help="no training: pool the runs of earlier --out files (same split) into one table; with --ranker, "
        "that bundle's ranks replace the files' ranker row (a new ranker against peers trained earlier)",
    )
    args = parser.parse_args(argv)
    if args.grid_point is not None and (args.grid_points is not None or args.quick):
        parser.error("--grid-point picks one setting; it cannot be combined with --grid-points or --quick")
    if args.combine:
        rescored = rescore_ranker(args.domain, args.ranker) if args.ranker else None
        rows = combine([Path(path) for path in args.combine], rescored)
        print_report(rows)
        if args.out:
            write_rows(rows, Path(args.out))
        return 0

    numpy_aliases()
    import torch

    from domainflow.catalog import get_domain

    # Small models on a shared 2-core CPU: one thread is many times faster per step than two fighting
    # for the cores (measured for our BPR in domainflow.recsys.baselines; RecBole's BPR: 90 s/epoch with 2).
    torch.set_num_threads(args.threads)
    spec = get_domain(args.domain)
    bundle, dataset_dir = (None, Path(args.dataset)) if args.dataset else find_ranker(args.domain, args.ranker)
    data = RankingData.load(dataset_dir)
    stages = {stage: data.stage(stage) for stage in ("valid", "test")}
    log = lambda message: print(message, flush=True)  # noqa: E731
    log(
        f"split {dataset_dir.name}: {len(stages['test'].users)} evaluated users, {len(data.index.items)} items; "
        f"ranker {bundle.name if bundle else 'none'}"
    )
    started = time.perf_counter()
    ours = ranker_ranks(bundle, data, spec) if bundle else None
    if ours is not None:
        log(
            f"  ranker: valid NDCG@10 {per_user(ours['valid'], 'ndcg_at_10').mean():.4f} "
            f"({time.perf_counter() - started:.0f} s)"
        )
    rows = []
    with tempfile.TemporaryDirectory(prefix="recsys-peers-") as tmp, contextlib.chdir(tmp):
        work = Path(tmp)  # also the working directory: RecBole writes log/ and log_tensorboard/ into it
        folders = {
            "general": atomic_export.export_general(data, work / "general" / NAME, NAME),
            "sequential": atomic_export.export_sequential(data, work / "sequential" / NAME, NAME, MAX_LENGTH),
        }
        bench = Bench(folders, data, stages, 3 if args.quick else args.max_epochs, work, log)
        for model_name in args.models:
            grid = grid_settings(model_name, args.grid_point, 1 if args.quick else args.grid_points)
            runs, chosen, record = run_peer(model_name, args.seeds, grid, bench)
            rows.append(
                table_row(
                    model_name,
                    [run.ranks["test"] for run in runs],
                    [float(per_user(run.ranks["valid"], "ndcg_at_10").mean()) for run in runs],
                    [ours["test"]] if ours else None,
                    dataset_dir.name,
                    params=chosen,
                    seed_numbers=[run.seed for run in runs],
                    run_seconds=[run.seconds for run in runs],
                    max_epochs=bench.max_epochs,
                    grid=record,
                )
            )
    if ours is not None:
        valid = float(per_user(ours["valid"], "ndcg_at_10").mean())
        rows.append(table_row(RANKER, [ours["test"]], [valid], None, dataset_dir.name))
    print_report(rows)
    if args.out:
        write_rows(rows, Path(args.out))
    return 0


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """The table's rows as JSON (intervals as dicts), with every run's test ranks for :func:`combine`."""

    def plain(value: Any) -> Any:
        return value.to_dict() if hasattr(value, "to_dict") else value

    path.write_text(json.dumps([{k: plain(v) for k, v in row.items()} for row in rows]))


def print_report(rows: list[dict[str, Any]]) -> None:
    """The table, the best peer's comparison with the ranker, and each peer's chosen setting."""
    peers = [row for row in rows if row["model"] != RANKER]
    has_ranker = len(peers) < len(rows)
    print()
    print(table(rows))
    best = max(peers, key=lambda row: row["ndcg_at_10"].mean) if peers else None
    if best is not None and has_ranker:
        verdict = best["ranker_minus"].verdict
        print(
            f"\nBest peer on test NDCG@10: {best['model']} ({best['ndcg_at_10'].mean:.4f}); ranker − it = "
            f"{best['ranker_minus'].text()}: {'goal reached' if verdict == 'win' else 'goal NOT reached'} "
            f"({verdict})."
        )
    for row in peers:
        print(
            f"  {row['model']}: chosen {row['params']}, seeds {row['seed_numbers']}, at most {row['max_epochs']} "
            f"epochs, mean train {np.mean(row['run_seconds']):.0f} s"
        )
        grid = row.get("grid") or []
        if len(grid) > 1:
            for point in grid:
                print(f"    grid: {point['params']} seed {point['seed']}: valid NDCG@10 {point['valid_ndcg']:.4f}")


def rescore_ranker(domain: str, bundle: str) -> tuple[Path, dict[str, np.ndarray]]:
    """(the dataset folder, per-user ranks on both stages) of a ranker bundle, on the split it was built on."""
    from domainflow.catalog import get_domain

    found, dataset_dir = find_ranker(domain, bundle)
    return dataset_dir, ranker_ranks(found, RankingData.load(dataset_dir), get_domain(domain))


def same_split(first: Path, second: Path) -> bool:
    """Whether two dataset folders hold the same split: byte-identical train and held-out files and the same
    catalogue order. Why not the folder name: it fingerprints the whole folder, and a later version of the
    ingest step may add a column to ``items.parquet`` or a field to the report without moving any user's
    history or target (the per-user ranks of the two folders then describe the same evaluation)."""
    same_files = all((first / name).read_bytes() == (second / name).read_bytes() for name in SPLIT_FILES)
    return same_files and RankingData.load(first).index.items == RankingData.load(second).index.items


def setting_key(row: dict[str, Any]) -> str:
    """A peer run's setting: its params and epoch cap (runs are pooled over seeds only within one)."""
    return json.dumps([row["params"], row["max_epochs"]], sort_keys=True)


def chosen_setting(name: str, parts: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Among a model's rows from several files, those of the setting the grid protocol chooses, and the grid.

    One setting: all its rows. Several (``--grid-point`` runs in separate processes): the setting whose run
    with the *first seed* (the smallest seed every setting was run with) has the best validation NDCG@10, as
    :func:`run_peer` chooses within one process; the other settings' runs only appear in the grid record
    (``[{"params", "max_epochs", "seed", "valid_ndcg"}]``, one per setting), never in the table's numbers.
    """
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        by_setting.setdefault(setting_key(part), []).append(part)
    if len(by_setting) == 1:
        (only,) = by_setting.values()
        return only, only[0].get("grid") or []
    seed_sets = [{seed for part in rows for seed in part["seed_numbers"]} for rows in by_setting.values()]
    common = set.intersection(*seed_sets)
    if not common:
        raise SystemExit(
            f"--combine: {name} was run with {len(by_setting)} settings / epoch caps {sorted(by_setting)} but no "
            "seed common to all of them: the grid is chosen on one seed's validation NDCG@10"
        )
    first = min(common)

    def first_seed_valid(rows: list[dict[str, Any]]) -> float:
        return next(
            valid
            for part in rows
            for seed, valid in zip(part["seed_numbers"], part["valid_ndcgs"], strict=True)
            if seed == first
        )

    grid = [
        grid_point(rows[0]["params"], rows[0]["max_epochs"], first, first_seed_valid(rows))
        for rows in by_setting.values()
    ]
    best = max(by_setting, key=lambda key: first_seed_valid(by_setting[key]))
    return by_setting[best], grid


def combine(files: list[Path], rescored: tuple[Path, dict[str, np.ndarray]] | None = None) -> list[dict[str, Any]]:
    """Rows of several ``--out`` files (e.g. one per seed or per model, run in separate processes or on
    separate machines) as one table: each model's runs pooled, its intervals recomputed over all of them.
    ``rescored`` (:func:`rescore_ranker`): the ranker row and the paired differences come from these ranks
    instead of the files' (peers need not be retrained when only the ranker changed; the split must be the
    same: the same folder, or a sibling folder of the files' split name holding the same split, :func:`same_split`).

    Why refuse mixes: the per-user ranks of two files can be averaged only when they rank the same
    users' targets on the same split, a model's runs only when they share its chosen setting and epoch
    cap, and a seed counted twice would narrow the interval with a copy. Runs of several settings of one model
    (a grid spread over processes with ``--grid-point``) are chosen among, not pooled (:func:`chosen_setting`).
    """
    loaded = [row for path in files for row in json.loads(Path(path).read_text())]
    splits = {row.get("split") for row in loaded}
    if len(splits) != 1 or None in splits:
        raise SystemExit(f"--combine needs files from one split; got {sorted(map(str, splits))}")
    (split,) = splits
    pooled: dict[str, list[dict[str, Any]]] = {}
    for row in loaded:
        pooled.setdefault(row["model"], []).append(row)
    ours = pooled.pop(RANKER, [])
    if rescored is not None:
        dataset_dir = rescored[0]
        if dataset_dir.name != split:
            theirs = dataset_dir.parent / split
            if not (theirs.is_dir() and same_split(dataset_dir, theirs)):
                raise SystemExit(
                    f"--combine --ranker: the bundle was built on {dataset_dir.name}, the files on {split}, "
                    "and the two folders do not hold the same split"
                )
            print(f"(the bundle's split {dataset_dir.name} holds the same train/held-out files as {split})")
        ranks = rescored[1]
        valid = float(per_user(ranks["valid"], "ndcg_at_10").mean())
        ours = [{"test_ranks": [ranks["test"].tolist()], "valid_ndcgs": [valid]}]
    if len({json.dumps(row["test_ranks"]) for row in ours}) > 1:
        raise SystemExit("--combine: the files hold different rankers' ranks (one ranker bundle per table)")
    reference = [np.asarray(ours[0]["test_ranks"][0])] if ours else None
    rows = []
    for name, all_parts in pooled.items():
        parts, grid = chosen_setting(name, all_parts)
        seeds = [seed for part in parts for seed in part["seed_numbers"]]
        if len(set(seeds)) < len(seeds):
            raise SystemExit(f"--combine: {name} has a seed in more than one file (seeds {sorted(seeds)})")
        rows.append(
            table_row(
                name,
                [np.asarray(ranks) for part in parts for ranks in part["test_ranks"]],
                [value for part in parts for value in part["valid_ndcgs"]],
                reference,
                split,
                params=parts[0]["params"],
                seed_numbers=seeds,
                run_seconds=[value for part in parts for value in part["run_seconds"]],
                max_epochs=parts[0]["max_epochs"],
                grid=grid,
            )
        )
    if ours and reference:
        rows.append(table_row(RANKER, reference, ours[0]["valid_ndcgs"], None, split))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
