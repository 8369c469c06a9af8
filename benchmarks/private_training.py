"""What privacy and federation cost on Banking77: DP-SGD at epsilon ~8 and ~1 against the same training without
privacy, and federated (FedAvg over non-IID clients) against the centralised run of the same budget.

Every row trains the same small set of weights on the frozen pretrained MiniLM (``--trainable head`` or ``lora``),
from the same zero head, with the project's own code (``domainflow.private_training``, ``domainflow.federated``):

* ``probe``: the pipeline's non-private linear probe (logistic regression on the frozen embeddings), for
  reference; it is what the other fp32 candidates start from.
* ``adam``: the non-private run of the DP loop's budget (same epochs, batch size and learning rate, no clipping,
  no noise): the federated code with one client, so the same loop as ``centralised`` below.
* ``dp-eps8``, ``dp-eps1``: DP-SGD, each with the epsilon it actually spent.
* ``federated``: ``--clients`` clients, Dirichlet(``--alpha``) by label, ``--rounds`` rounds of ``--local-epochs``.
* ``centralised``: one client holding every row, the same rounds and local epochs: the same number of passes
  over the data and of optimizer steps, the same optimizer reset each round.

Usage (the numbers in the README came from the first command; ``--per-class 0`` is the full training split)::

    .venv/bin/python benchmarks/private_training.py --trainable head --per-class 0
    .venv/bin/python benchmarks/private_training.py --trainable lora --per-class 40 --rounds 5

Prints a table, and writes it as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domainflow.federated import FederatedMethod, FederatedSetup, run_federated  # noqa: E402
from domainflow.local_training import BaseSpec, TrainableModel, lora_method, text_features  # noqa: E402
from domainflow.modeling import padded_batches, resolve_base_model  # noqa: E402
from domainflow.private_training import DpMethod, fit_private  # noqa: E402
from domainflow.spec import PeftSettings  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "banking77"


def read_split(split: str) -> tuple[list[str], list[str]]:
    import csv

    with open(DATA / f"{split}.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [row["text"].strip() for row in rows], [row["category"] for row in rows]


def stratified(texts: list[str], labels: list[str], per_class: int, seed: int) -> tuple[list[str], list[str]]:
    """At most ``per_class`` rows of each label, drawn at random (all rows when ``per_class`` is 0)."""
    if per_class <= 0:
        return texts, labels
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    keep = sorted(i for rows in by_label.values() for i in rng.permutation(rows)[:per_class])
    return [texts[i] for i in keep], [labels[i] for i in keep]


def write_dataset(texts: list[str], labels: list[int], out: Path, seed: int) -> Path:
    """train/validation (10%, stratified) as a ``save_to_disk`` folder, what the federated learners read."""
    from datasets import Dataset, DatasetDict
    from sklearn.model_selection import train_test_split

    train_x, valid_x, train_y, valid_y = train_test_split(
        texts, labels, test_size=max(0.1, len(set(labels)) / len(labels)), stratify=labels, random_state=seed
    )
    DatasetDict(
        {
            "train": Dataset.from_dict({"text": train_x, "label": train_y}),
            "validation": Dataset.from_dict({"text": valid_x, "label": valid_y}),
        }
    ).save_to_disk(str(out))
    return out


def accuracy(trainable: TrainableModel, texts: list[str], labels: np.ndarray, max_length: int) -> float:
    import torch

    model = trainable.model.eval()
    predicted = np.empty(len(texts), dtype=np.int64)
    with torch.inference_mode():
        if trainable.trainable == "head":
            predicted[:] = model.classifier(text_features(trainable, texts, max_length)).argmax(-1).numpy()
        else:
            for index, ids, mask in padded_batches(trainable.tokenizer, texts, max_length, 64):
                predicted[index] = model(input_ids=ids, attention_mask=mask)["logits"].argmax(-1).numpy()
    return float((predicted == labels).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainable", choices=["head", "lora"], default="head")
    parser.add_argument("--per-class", type=int, default=0, help="training rows per intent (0: all)")
    parser.add_argument("--layers", type=int, default=None, help="keep the first N encoder layers (quick runs)")
    parser.add_argument("--epsilons", type=float, nargs="*", default=[8.0, 1.0])
    parser.add_argument("--epochs", type=int, default=3, help="DP and non-private passes over the training rows")
    parser.add_argument("--batch-size", type=int, default=256, help="expected batch size of the DP runs")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-2 head, 2e-3 lora)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=float, default=1.0)
    parser.add_argument("--fed-batch-size", type=int, default=32)
    parser.add_argument("--skip", nargs="*", default=[], help="rows to skip: probe adam dp federated centralised")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    lr = args.lr if args.lr is not None else (1e-2 if args.trainable == "head" else 2e-3)
    adapter = lora_method(PeftSettings(), lr) if args.trainable == "lora" else None
    base = BaseSpec(base_model=resolve_base_model(None), num_layers=args.layers, max_length=64)
    train_texts, train_names = stratified(*read_split("train"), args.per_class, args.seed)
    test_texts, test_names = read_split("test")
    names = sorted(set(train_names))
    index = {name: i for i, name in enumerate(names)}
    test_labels = np.array([index[n] for n in test_names])
    rows: list[dict[str, Any]] = []
    print(
        f"Banking77: {len(train_texts)} training rows ({'all' if args.per_class <= 0 else f'{args.per_class}/intent'}),"
        f" {len(test_texts)} test rows; trainable {args.trainable}; base {base.base_model} layers {args.layers or 6}",
        flush=True,
    )

    def record(name: str, accuracy_: float, seconds: float, **extra: Any) -> None:
        row = {
            "run": name,
            "trainable": args.trainable,
            "test_accuracy": round(accuracy_, 4),
            "seconds": round(seconds),
        }
        row.update(extra)
        rows.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory(prefix="private-bench-") as work:
        dataset = write_dataset(train_texts, [index[n] for n in train_names], Path(work) / "data", args.seed)
        from datasets import load_from_disk

        train = load_from_disk(str(dataset))["train"]
        texts, labels = list(train["text"]), list(train["label"])

        if "probe" not in args.skip:
            from sklearn.linear_model import LogisticRegression

            from domainflow.local_training import build_trainable

            started = time.perf_counter()
            head = build_trainable(base, len(names), "head")
            probe = LogisticRegression(max_iter=3000).fit(text_features(head, texts, base.max_length).numpy(), labels)
            predicted = probe.predict(text_features(head, test_texts, base.max_length).numpy())
            record("probe (non-private)", float((predicted == test_labels).mean()), time.perf_counter() - started)

        def federated(name: str, clients: int, rounds: int, local_epochs: float, batch: int) -> None:
            method = FederatedMethod(
                trainable=args.trainable,
                clients=clients,
                rounds=rounds,
                local_epochs=local_epochs,
                partition="dirichlet" if clients > 1 else "iid",
                alpha=args.alpha,
                batch_size=batch,
                learning_rate=lr,
                adapter=adapter,
            )
            setup = FederatedSetup(
                dataset_path=str(dataset), num_labels=len(names), base=base, method=method, seed=args.seed
            )
            run = run_federated(setup)
            extra = {"clients": clients, "rounds": rounds, "local_epochs": local_epochs}
            if clients > 1:
                extra["client_rows"] = run.record["client_rows"]
                extra["labels_per_client"] = run.record["client_labels"]
            record(name, accuracy(run.trainable, test_texts, test_labels, base.max_length), run.seconds, **extra)

        if "adam" not in args.skip:  # the DP budget without privacy: one client, one round per epoch
            federated("non-private (same loop)", 1, args.epochs, 1.0, args.batch_size)
        if "dp" not in args.skip:
            for epsilon in args.epsilons:
                method = DpMethod(
                    trainable=args.trainable,
                    target_epsilon=epsilon,
                    max_grad_norm=args.max_grad_norm,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    learning_rate=lr,
                    adapter=adapter,
                )
                run = fit_private(texts, labels, len(names), base, method, args.seed)
                p = run.record
                record(
                    f"dp eps={epsilon:g}",
                    accuracy(run.trainable, test_texts, test_labels, base.max_length),
                    run.seconds,
                    epsilon_spent=round(p["epsilon"], 3),
                    delta=float(f"{p['delta']:.3g}"),
                    noise_multiplier=round(p["noise_multiplier"], 3),
                    steps=p["steps"],
                )
        if "federated" not in args.skip:
            federated("federated", args.clients, args.rounds, args.local_epochs, args.fed_batch_size)
        if "centralised" not in args.skip:
            federated("centralised (same budget)", 1, args.rounds, args.local_epochs, args.fed_batch_size)

    print()
    print("| run | trainable | test accuracy | epsilon spent | delta | seconds |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        eps = row.get("epsilon_spent", "—")
        delta = row.get("delta", "—")
        print(
            f"| {row['run']} | {row['trainable']} | {row['test_accuracy']:.4f} | {eps} | {delta} | {row['seconds']} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
