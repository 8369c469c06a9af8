"""Stratified subsampling and the validation split: every class kept, in proportion, reproducibly.

Why stratified everywhere: with 77 intents and a few rows each, a plain random sample of a
quick run drops rare classes, and a validation slice without a class cannot tell early stopping
or model choice how that class fares. Everything is seeded, so the same inputs give the same
rows (the output folder is named by the inputs, so it must).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Mapping, Sequence

import numpy as np
from sklearn.model_selection import train_test_split

from domainflow.data.validation import Rows
from domainflow.logs import run_logger

SPLITS = ("train", "validation", "test")


def allocate(sizes: Mapping[int, int], budget: int) -> dict[int, int]:
    """Per-class quotas summing to ``budget``: proportional, but at least 2 (else 1) per class where the budget allows.

    Pure proportional sampling would drop rare classes from a small subsample, and a
    class with one row cannot be stratified into train and validation.
    """
    for floor in (2, 1, 0):
        minimum = {label: min(floor, size) for label, size in sizes.items()}
        if sum(minimum.values()) <= budget:
            break
    spare = {label: sizes[label] - minimum[label] for label in sizes}
    remaining = min(budget - sum(minimum.values()), sum(spare.values()))
    total_spare = max(sum(spare.values()), 1)
    # largest-remainder apportionment of the remaining budget, in exact integer arithmetic
    quotas = {label: minimum[label] + remaining * spare[label] // total_spare for label in sizes}
    remainders = {label: remaining * spare[label] % total_spare for label in sizes}
    leftover = min(budget, sum(sizes.values())) - sum(quotas.values())
    for label in sorted(sizes, key=lambda label: (-remainders[label], label))[:leftover]:
        quotas[label] += 1
    return quotas


def stratified_subsample(labels: Sequence[int], limit: int | None, seed: int) -> list[int]:
    """Positions of a class-balanced subsample of at most ``limit`` rows, in source order."""
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    groups: dict[int, list[int]] = defaultdict(list)
    for position, label in enumerate(labels):
        groups[label].append(position)
    quotas = allocate({label: len(positions) for label, positions in groups.items()}, limit)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in sorted(groups):
        chosen.extend(rng.choice(groups[label], size=quotas[label], replace=False).tolist())
    return sorted(chosen)


def carve_validation(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified (train, validation) positions, with every class of 2+ rows represented in validation.

    sklearn needs at least as many validation rows as classes; on a small dataset the
    validation slice is therefore enlarged to one row per class rather than failing.
    Classes with a single row stay in train.
    """
    counts = Counter(labels)
    splittable = [p for p, label in enumerate(labels) if counts[label] >= 2]
    singles = [p for p, label in enumerate(labels) if counts[label] < 2]
    classes = len({labels[p] for p in splittable})
    if fraction <= 0 or classes == 0:
        return list(range(len(labels))), []
    wanted = round(fraction * len(splittable))
    size = min(max(wanted, classes), len(splittable) - classes)
    if size > wanted:
        run_logger(__name__).info(
            "validation split enlarged from %d to %d rows so that each of %d classes appears", wanted, size, classes
        )
    train_pos, validation_pos = train_test_split(
        splittable, test_size=size, stratify=[labels[p] for p in splittable], random_state=seed
    )
    return list(train_pos) + singles, list(validation_pos)


def split(
    train: Rows, test: Rows, fraction: float, max_train: int | None, max_test: int | None, seed: int
) -> dict[str, Rows]:
    """Subsample train (before carving validation, so max_train_samples bounds train+validation) and test."""
    train = train.select(stratified_subsample(train.labels, max_train, seed))
    test = test.select(stratified_subsample(test.labels, max_test, seed))
    train_pos, validation_pos = carve_validation(train.labels, fraction, seed)
    return {"train": train.select(train_pos), "validation": train.select(validation_pos), "test": test}
