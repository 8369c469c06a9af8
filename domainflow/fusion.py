"""Model fusion: an ensemble of classifiers, and a cascade from a fast classifier to a strong one.

Both are *models* in the registry's sense: one folder, loaded by :func:`domainflow.modeling.load_classifier`,
called like any classifier (``model(input_ids=…, attention_mask=…)["logits"]``), so evaluation, the gates, the
speed measurement, the registry, ``domainflow serve`` and the benchmarks treat them as they treat any champion,
with no branch of their own. Why one folder holding copies of the members (``members/<i>/``) rather than
references to the run's model folders: a promoted champion must stay loadable after the run's folders are
cleaned up, and the registry copies and verifies one folder.

* **Ensemble** — the weighted mean of the members' class probabilities. Its "logits" are the log of that
  mean, so ``softmax`` of them gives back the mean exactly. Members must share the label list, the tokenizer and
  the maximum length (they are fed the same token ids).
* **Cascade** — the fast member answers a text when its top probability is at or above ``threshold``; the
  others are passed on to the strong member, only those rows, trimmed to their own length. The threshold is
  calibrated on the validation split (:func:`calibrate_threshold`): the lowest that keeps the cascade's
  validation accuracy within ``margin`` of the strong model's. Threshold 0 answers everything with the fast
  model; any threshold above 1 passes everything on.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ENSEMBLE = "ensemble"
CASCADE = "cascade"
FUSION_KEY = "fusion"  # the metadata entry (domainflow.json) that makes a folder a fused model
MEMBERS_DIR = "members"
#: Files that define how texts become token ids: members must agree on them byte for byte.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "special_tokens_map.json")


class FusionError(ValueError):
    """Members that cannot be fused (different labels, tokenizers or lengths), or a malformed fused folder."""


def _log_probabilities(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask)["logits"].float(), dim=-1)


class EnsembleClassifier:
    """Weighted mean of the members' class probabilities (returned as its log, under the key ``logits``)."""

    def __init__(self, members: Sequence[Any], weights: Sequence[float]) -> None:
        if len(members) < 2 or len(members) != len(weights):
            raise FusionError(f"an ensemble needs two or more members with one weight each, got {len(members)}")
        total = float(sum(weights))
        if total <= 0 or any(w < 0 for w in weights):
            raise FusionError(f"ensemble weights must be non-negative with a positive sum, got {list(weights)}")
        self.members = list(members)
        self.log_weights = torch.log(torch.tensor([w / total for w in weights], dtype=torch.float32))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        stacked = torch.stack([_log_probabilities(m, input_ids, attention_mask) for m in self.members])
        return {"logits": torch.logsumexp(stacked + self.log_weights.view(-1, 1, 1), dim=0)}

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> torch.Tensor:
        """The first member's sentence embeddings (retrieval and out-of-scope distances need one space)."""
        return self.members[0].embed(input_ids, attention_mask)

    @property
    def embedding_size(self) -> int:
        from domainflow.modeling import embedding_size

        return embedding_size(self.members[0])

    def eval(self) -> EnsembleClassifier:
        for member in self.members:
            if hasattr(member, "eval"):
                member.eval()
        return self


class CascadeClassifier:
    """The fast member answers what it is sure of; the rest go to the strong member. Counts what it passes on."""

    def __init__(self, fast: Any, strong: Any, threshold: float) -> None:
        self.fast, self.strong, self.threshold = fast, strong, float(threshold)
        self.texts_seen = 0
        self.texts_passed_on = 0

    @property
    def members(self) -> list[Any]:
        return [self.fast, self.strong]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        out = _log_probabilities(self.fast, input_ids, attention_mask)
        unsure = (out.exp().max(dim=1).values < self.threshold).nonzero().flatten()
        self.texts_seen += int(input_ids.shape[0])
        self.texts_passed_on += int(unsure.numel())
        if unsure.numel():
            mask = attention_mask[unsure]
            width = int(mask.sum(dim=1).max())  # padding the unsure texts do not need (right padding)
            if bool(mask[:, width:].any()):
                width = mask.shape[1]  # left-padded: keep every column
            out[unsure] = _log_probabilities(self.strong, input_ids[unsure, :width], mask[:, :width])
        return {"logits": out}

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> torch.Tensor:
        """The fast member's embeddings: what the cascade computes for every text anyway."""
        return self.fast.embed(input_ids, attention_mask)

    @property
    def embedding_size(self) -> int:
        from domainflow.modeling import embedding_size

        return embedding_size(self.fast)

    def share_passed_on(self) -> float | None:
        return self.texts_passed_on / self.texts_seen if self.texts_seen else None

    def reset_counts(self) -> None:
        self.texts_seen = self.texts_passed_on = 0

    def eval(self) -> CascadeClassifier:
        for member in self.members:
            if hasattr(member, "eval"):
                member.eval()
        return self


FusedClassifier = EnsembleClassifier | CascadeClassifier


# ------------------------------------------------------------------------------------------ calibration


@dataclass(frozen=True)
class CascadeCalibration:
    """The threshold chosen on validation and what it gives there."""

    threshold: float
    margin: float
    met: bool  # False: no threshold passing on at most max_passed_on kept accuracy within the margin
    validation_accuracy: float
    strong_validation_accuracy: float
    fast_validation_accuracy: float
    validation_passed_on: float  # share of validation texts the strong member answers

    def describe(self) -> str:
        verdict = "within" if self.met else "NOT within"
        return (
            f"threshold {self.threshold:.4f}: validation accuracy {self.validation_accuracy:.4f} {verdict} "
            f"{self.margin:.4f} of the strong model's {self.strong_validation_accuracy:.4f} "
            f"(fast alone {self.fast_validation_accuracy:.4f}), {100 * self.validation_passed_on:.1f}% passed on"
        )


def calibrate_threshold(
    fast_probabilities: np.ndarray,
    strong_probabilities: np.ndarray,
    labels: np.ndarray,
    margin: float,
    max_passed_on: float = 1.0,
) -> CascadeCalibration:
    """The lowest threshold whose cascade keeps validation accuracy within ``margin`` of the strong model's.

    Candidate thresholds are the fast model's own top probabilities (accuracy only changes there) plus 0. With
    ``max_passed_on`` below 1 a threshold must also pass on at most that share of texts (a cascade that sends
    nearly everything on is the strong model, slower); when none qualifies, the calibration is ``met=False``
    and holds the threshold that came closest in accuracy within the share, for the gate to quote.
    """
    labels = np.asarray(labels)
    confidence = fast_probabilities.max(axis=1)
    fast_right = fast_probabilities.argmax(axis=1) == labels
    strong_right = strong_probabilities.argmax(axis=1) == labels
    target = strong_right.mean() - margin
    order = np.argsort(confidence)  # thresholds in increasing order: a threshold t passes on confidence < t
    sorted_confidence = confidence[order]
    # Accuracy when the k least confident texts are passed on: fast on the rest, strong on those k.
    passed_strong = np.concatenate([[0], np.cumsum(strong_right[order])])
    kept_fast = fast_right[order].sum() - np.concatenate([[0], np.cumsum(fast_right[order])])
    accuracy = (passed_strong + kept_fast) / len(labels)
    best_k: int | None = None
    fallback_k = 0
    for k in range(len(labels) + 1):
        if k and k < len(labels) and sorted_confidence[k] == sorted_confidence[k - 1]:
            continue  # ties move together: no threshold separates them
        if k / len(labels) > max_passed_on + 1e-12:
            break
        if accuracy[k] > accuracy[fallback_k]:
            fallback_k = k
        if accuracy[k] >= target - 1e-12:
            best_k = k
            break
    k = best_k if best_k is not None else fallback_k
    threshold = 0.0 if k == 0 else (float(sorted_confidence[k]) if k < len(labels) else 1.0 + 1e-6)
    return CascadeCalibration(
        threshold=threshold,
        margin=margin,
        met=best_k is not None,
        validation_accuracy=float(accuracy[k]),
        strong_validation_accuracy=float(strong_right.mean()),
        fast_validation_accuracy=float(fast_right.mean()),
        validation_passed_on=k / len(labels),
    )


#: Thresholds at which the report draws a cascade's accuracy/speed trade-off (above 1: the strong model alone).
CURVE_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.01)


def cascade_curve(
    fast_probabilities: np.ndarray,
    strong_probabilities: np.ndarray,
    labels: np.ndarray,
    metrics: Sequence[str] = ("accuracy",),
    thresholds: Sequence[float] = CURVE_THRESHOLDS,
) -> list[dict[str, float]]:
    """The cascade's ``metrics`` and share passed on at each threshold, from both members' probabilities on the
    same texts: what the calibrated threshold was chosen from, as a curve a person can read (threshold 0 is the
    fast model alone, above 1 the strong one alone). Each point is exactly what the cascade would answer there."""
    from domainflow.metrics import compute_metrics

    labels = np.asarray(labels)
    confidence = fast_probabilities.max(axis=1)
    fast_answer, strong_answer = fast_probabilities.argmax(axis=1), strong_probabilities.argmax(axis=1)
    points = []
    for threshold in thresholds:
        passed = confidence < threshold
        answers = np.where(passed, strong_answer, fast_answer)
        scores = compute_metrics(list(metrics), answers, labels)
        points.append({"threshold": float(threshold), "passed_on": float(passed.mean()), **scores})
    return points


def cascade_texts_per_second(fast: float, strong: float, passed_on: float) -> float:
    """Throughput of a cascade whose fast model reads every text and whose strong model reads ``passed_on`` of
    them, from each member's own measured texts/s (what the curve's speed axis is estimated from)."""
    return 1.0 / (1.0 / fast + passed_on / strong)


def simplex_grid(members: int, step: float) -> np.ndarray:
    """Every weight vector of ``members`` non-negative multiples of ``step`` that sum to 1 (rows)."""
    units = round(1 / step)

    def compositions(parts: int, total: int) -> list[list[int]]:
        if parts == 1:
            return [[total]]
        return [[first, *rest] for first in range(total + 1) for rest in compositions(parts - 1, total - first)]

    return np.asarray(compositions(members, units), dtype=np.float64) / units


def fit_weights(member_probabilities: Sequence[np.ndarray], labels: np.ndarray, step: float = 0.05) -> list[float]:
    """Ensemble weights with the lowest log-loss on (validation) ``labels``, searched on a grid of ``step``.

    Why a grid rather than an optimiser: with two or three members it is exhaustive and cheap (231 points for
    three members at 0.05), deterministic, and its coarseness is a guard against fitting the validation noise.
    Ties keep the first grid point found (the most weight on the earliest members).
    """
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in member_probabilities])  # members x texts x labels
    rows = np.arange(stacked.shape[1])
    chosen = stacked[:, rows, np.asarray(labels)]  # each member's probability of the true label: members x texts
    grid = simplex_grid(len(member_probabilities), step)[::-1]
    losses = -np.log(np.clip(grid @ chosen, 1e-12, None)).mean(axis=1)
    return [float(w) for w in grid[int(np.argmin(losses))]]


# ------------------------------------------------------------------------------------------ folders


def _tokenizer_digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = model_dir / name
        digest.update(name.encode() + (path.read_bytes() if path.is_file() else b"-"))
    return digest.hexdigest()


def check_compatible(member_dirs: Sequence[Path]) -> dict[str, Any]:
    """The shared label list and maximum length of the members; a FusionError names what differs and where."""
    from domainflow.modeling import read_metadata

    first = Path(member_dirs[0])
    reference = read_metadata(first)
    for other in member_dirs[1:]:
        metadata = read_metadata(Path(other))
        for key in ("label_names", "max_length"):
            if metadata.get(key) != reference.get(key):
                raise FusionError(f"cannot fuse {first} and {other}: their {key} differ")
        if _tokenizer_digest(Path(other)) != _tokenizer_digest(first):
            raise FusionError(f"cannot fuse {first} and {other}: their tokenizers differ")
    return {"label_names": reference["label_names"], "max_length": reference["max_length"]}


def write_fused(
    out_dir: Path, kind: str, member_dirs: Sequence[Path], fusion: dict[str, Any], metadata: dict[str, Any]
) -> Path:
    """A fused model's folder: each member copied under ``members/<i>``, the shared tokenizer and the first
    member's encoder config at the top (what ``load_classifier`` builds the tokenizer from), and
    ``domainflow.json`` with the ``fusion`` entry."""
    from domainflow.modeling import FORMAT_VERSION, write_metadata

    shared = check_compatible(member_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    members = []
    for index, member in enumerate(member_dirs):
        relative = f"{MEMBERS_DIR}/{index}"
        shutil.copytree(member, out_dir / relative)
        members.append(relative)
    for path in Path(member_dirs[0]).iterdir():  # the tokenizer, and the encoder config it is built with
        if path.name.startswith(("tokenizer", "special_tokens", "vocab")) or path.name == "config.json":
            shutil.copy2(path, out_dir / path.name)
    write_metadata(
        out_dir,
        {
            "format_version": FORMAT_VERSION,
            "architecture": kind,
            **shared,
            "compression": None,
            **metadata,
            FUSION_KEY: {"kind": kind, "members": members, **fusion},
        },
    )
    return out_dir


def load_fused(model_dir: Path, fusion: dict[str, Any]) -> FusedClassifier:
    """The members loaded (each with its own recipe: an int8 member stays int8) and fused as the folder says."""
    from domainflow.modeling import load_classifier

    try:
        members = [load_classifier(model_dir / relative).model for relative in fusion["members"]]
        if fusion["kind"] == ENSEMBLE:
            return EnsembleClassifier(members, fusion["weights"])
        if fusion["kind"] == CASCADE:
            fast, strong = members
            return CascadeClassifier(fast, strong, fusion["threshold"])
    except KeyError as exc:
        raise FusionError(f"{model_dir}: the fusion entry of its metadata lacks {exc}") from exc
    raise FusionError(f"{model_dir}: unknown fusion kind {fusion['kind']!r} (known: {ENSEMBLE}, {CASCADE})")


def leaf_models(model: Any) -> list[Any]:
    """The leaf models of a (possibly fused) model, for size and parameter counts."""
    if isinstance(model, EnsembleClassifier | CascadeClassifier):
        return [leaf for member in model.members for leaf in leaf_models(member)]
    return [model]
