"""Why a classifier answered what it did: one attribution score per *word* of a text, for a label.

Two methods, both answering in words (what a user reads), never in sub-word tokens:

* ``occlusion`` (leave one word out): the text and each of its one-word-deleted variants go to the
  model in **one** call; a word's score is how much the label's log-odds drop without it (negative:
  the label is likelier without the word). It needs nothing but the model's answers, so
  it explains whatever :func:`domainflow.modeling.load_classifier` returns — the deployed ONNX int8
  champion itself, a torch int8 model, an ensemble or a cascade — which is the point: the served
  model is explained, not a cousin of it. Its cost is one batch of (words + 1) texts.
* ``integrated_gradients``: captum's ``LayerIntegratedGradients`` on the word-embedding layer of an
  fp32 torch ``TextClassifier`` (gradients need fp32 weights; an ONNX graph or a dynamically quantized
  model has none), from a baseline where every non-special token is ``[PAD]``; a word's score is the
  sum of its sub-tokens' attributions to the label's log-odds (completeness: the scores add up to
  the log-odds of the text minus those of the baseline, up to the integration error). captum is an optional extra
  (``pip install domainflow[explain]``); occlusion never needs it.

Why log-odds, log(p / (1 − p)), and not the probability itself: a fine-tuned model is mostly far
surer than it needs to be, and its probability saturates. Measured on the customer_service champion,
"I still have not received my new card" is card_arrival at p = 1.0000 with or without any one of its
words, so every probability drop is 0.000 and the explanation says nothing; the log-odds drops are
card 9.8, new 5.6, received 5.1, my 3.2, not 2.2, I 2.1, still 1.9, have 0.8. The order of the words
is the same wherever the probability does not saturate (both are monotone in the deleted text's
probability); the log-odds are computed from the logits, so they never saturate.

Faithfulness is measured, not assumed (``benchmarks/explain_faithfulness.py``): deleting a text's top-k
attributed words must lower the predicted probability more than deleting k random words
(comprehensiveness / AOPC: :func:`deletion_drops`, :func:`beats_random`). A method that does not is
taken out of :data:`OFFERED_METHODS`, the only methods the service and the CLI accept.

On an ONNX int8 graph, activations are quantized with ranges taken from the whole batch, so a text's
probabilities move a little with what it is batched with (here: its own variants); the scores are the drops
within that one call, and the explanation's probability can differ slightly from a batch-1 prediction.

Words are runs of letters and digits (an apostrophe or hyphen inside a word keeps it whole: "hasn't",
"top-up"); punctuation is never a unit and stays in every variant. Words past the model's
``max_length`` tokens are not read by the model: they score 0 and cost no model row.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from domainflow.modeling import LoadedClassifier, TextClassifier, predict_logits, predict_proba

if TYPE_CHECKING:
    from rich.text import Text

#: What the service and the CLI offer: the methods that beat random deletion in the faithfulness benchmark
#: (benchmarks/explain_faithfulness.py measures them and fails when a listed method no longer beats random).
OFFERED_METHODS: tuple[str, ...] = ("occlusion", "integrated_gradients")
#: Integration steps of integrated gradients (captum's default Gauss-Legendre rule).
IG_STEPS = 32
#: Rows per forward pass when many texts are explained at once (the benchmark, the model card's summary).
MANY_TEXTS_BATCH = 64

_WORD = re.compile(r"\w+(?:['’\-]\w+|(?<=\d)[.,]\d+)*")


class ExplanationUnavailableError(ValueError):
    """The method cannot explain this model (integrated gradients on an ONNX graph, or without captum)."""


@dataclass(frozen=True)
class Word:
    """A word of the text and where it is (character offsets, end exclusive)."""

    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Explanation:
    """A prediction and, for the predicted label (and another one when asked), one score per word."""

    text: str
    method: str
    words: list[Word]
    label: str
    score: float  # the predicted label's probability
    scores: list[float]  # one per word, for ``label``
    other_label: str | None = None
    other_score: float | None = None  # its probability
    other_scores: list[float] | None = None

    def as_dict(self, digits: int = 6) -> dict[str, Any]:
        """The JSON answer (:class:`serving.schemas.ExplainResponse` without the domain and version), numbers to
        ``digits`` significant digits (an unlikely label's probability is 3e-08, not 0.0)."""

        def rounded(value: float) -> float:
            return float(f"{value:.{digits}g}")

        words = []
        for i, word in enumerate(self.words):
            entry: dict[str, Any] = {"word": word.text, "start": word.start, "end": word.end}
            entry["score"] = rounded(self.scores[i])
            if self.other_scores is not None:
                entry["other_score"] = rounded(self.other_scores[i])
            words.append(entry)
        answer: dict[str, Any] = {"method": self.method, "label": self.label, "score": rounded(self.score)}
        if self.other_label is not None and self.other_score is not None:
            answer.update(other_label=self.other_label, other_score=rounded(self.other_score))
        answer["words"] = words
        return answer


def split_words(text: str) -> list[Word]:
    """The words of ``text`` with their character offsets (see the module docstring for what a word is)."""
    return [Word(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def without_words(text: str, words: Sequence[Word]) -> str:
    """``text`` with ``words`` cut out (the whitespace left behind collapses to single spaces)."""
    kept, position = [], 0
    for word in sorted(words, key=lambda w: w.start):
        kept.append(text[position : word.start])
        position = word.end
    kept.append(text[position:])
    return " ".join("".join(kept).split())


def encode_with_offsets(loaded: LoadedClassifier, text: str, **options: Any) -> Any:
    """The model's tokens of ``text`` as it reads them (truncated to ``max_length``), with each token's character
    offsets and which tokens are special ([CLS], [SEP])."""
    return loaded.tokenizer(
        text,
        truncation=True,
        max_length=loaded.max_length,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        **options,
    )


def visible_word_count(loaded: LoadedClassifier, text: str, words: Sequence[Word]) -> int:
    """How many of the leading ``words`` the model reads before it truncates at ``max_length`` tokens.

    From the tokenizer's character offsets; a tokenizer without offsets (a slow one) is taken to read every word.
    """
    try:
        encoded = encode_with_offsets(loaded, text)
    except (NotImplementedError, TypeError, ValueError):
        return len(words)
    pairs = zip(encoded["offset_mapping"], encoded["special_tokens_mask"], strict=True)
    last = max((end for (_, end), special in pairs if not special), default=0)
    return sum(1 for word in words if word.start < last)


def label_index(loaded: LoadedClassifier, label: str) -> int:
    """The index of one of the model's labels; a ValueError that names the known labels otherwise."""
    try:
        return loaded.label_names.index(label)
    except ValueError:
        shown = ", ".join(loaded.label_names[:10]) + (", …" if len(loaded.label_names) > 10 else "")
        raise ValueError(f"unknown label {label!r}: the model has {len(loaded.label_names)} labels ({shown})") from None


def _explanation(
    loaded: LoadedClassifier,
    text: str,
    method: str,
    words: list[Word],
    probabilities: torch.Tensor,
    other: int | None,
    scores_for: Callable[[list[int]], list[list[float]]],
) -> Explanation:
    """The predicted label from ``probabilities``, and the scores ``scores_for([predicted, other])`` gives."""
    predicted = int(probabilities.argmax())
    targets = [predicted] if other is None else [predicted, other]
    scores = scores_for(targets)
    return Explanation(
        text=text,
        method=method,
        words=words,
        label=loaded.label_names[predicted],
        score=float(probabilities[predicted]),
        scores=scores[0],
        other_label=loaded.label_names[other] if other is not None else None,
        other_score=float(probabilities[other]) if other is not None else None,
        other_scores=scores[1] if other is not None else None,
    )


# ------------------------------------------------------------------------------------------ occlusion


def log_odds(logits: torch.Tensor) -> torch.Tensor:
    """Each label's log-odds, log(p / (1 - p)) = its logit - logsumexp(the other logits), shape as ``logits``.

    From the logits, never from probabilities: at p = 1.0 in float32 the probability has lost the evidence.
    """
    logits = logits.float()
    labels = logits.shape[-1]
    others = logits.unsqueeze(-2).expand(*logits.shape[:-1], labels, labels)
    diagonal = torch.eye(labels, dtype=torch.bool, device=logits.device)
    return logits - others.masked_fill(diagonal, float("-inf")).logsumexp(dim=-1)


@dataclass(frozen=True)
class OccludedText:
    """A text's words, how many of them the model reads, and the logits of the text (row 0) and of each read
    word's deletion (row i + 1)."""

    words: list[Word]
    visible: int
    logits: torch.Tensor

    @property
    def probabilities(self) -> torch.Tensor:
        """The text's label probabilities."""
        return torch.softmax(self.logits[0].float(), dim=-1)

    def drops(self, target: int) -> list[float]:
        """Per word, how much ``target``'s log-odds drop when it is deleted (0 for a word the model does not
        read)."""
        odds = log_odds(self.logits)[:, target]
        return (odds[0] - odds[1:]).tolist() + [0.0] * (len(self.words) - self.visible)


def occlude(loaded: LoadedClassifier, texts: Sequence[str], batch_size: int | None = None) -> list[OccludedText]:
    """Every text and each of its one-word-deleted variants through the model in one :func:`predict_logits` call.

    ``batch_size`` None: all rows in a single forward pass (one explanation); many texts at once pass
    :data:`MANY_TEXTS_BATCH`, and their rows are length-sorted into passes like any batch.
    """
    variants: list[str] = []
    layout: list[tuple[list[Word], int, int]] = []
    for text in texts:
        words = split_words(text)
        visible = visible_word_count(loaded, text, words)
        layout.append((words, visible, len(variants)))
        variants.append(text)
        variants.extend(without_words(text, [word]) for word in words[:visible])
    logits = predict_logits(loaded, variants, batch_size=batch_size or max(1, len(variants)))
    return [OccludedText(words, visible, logits[start : start + visible + 1]) for words, visible, start in layout]


def occlusion(loaded: LoadedClassifier, text: str, other_label: str | None = None) -> Explanation:
    """Leave-one-word-out scores for the predicted label (and ``other_label``), from one model call."""
    other = label_index(loaded, other_label) if other_label is not None else None
    (occluded,) = occlude(loaded, [text])
    return _explanation(
        loaded,
        text,
        "occlusion",
        occluded.words,
        occluded.probabilities,
        other,
        lambda targets: [occluded.drops(t) for t in targets],
    )


# ------------------------------------------------------------------------------------------ integrated gradients


def integrated_gradients_unavailable(loaded: LoadedClassifier) -> str | None:
    """Why integrated gradients cannot explain this model, or None when it can."""
    from domainflow.compression import TORCH_RECIPES

    model, name = loaded.model, loaded.metadata.get("candidate") or "this model"
    if not isinstance(model, TextClassifier):
        kind = "an ONNX Runtime graph" if loaded.metadata.get("onnx_file") else "a fused model (ensemble or cascade)"
        return (
            f"{name} is {kind} without fp32 torch weights, and integrated gradients needs gradients through them; "
            "use method 'occlusion', which explains this very model"
        )
    if loaded.metadata.get("compression") in TORCH_RECIPES:
        return (
            f"{name} is quantized to int8 ({loaded.metadata['compression']}), which has no gradients; "
            "use method 'occlusion'"
        )
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        return "integrated gradients needs captum: pip install 'domainflow[explain]' (or use method 'occlusion')"
    return None


def _token_words(offsets: Sequence[tuple[int, int]], special: Sequence[int], words: Sequence[Word]) -> list[int]:
    """The word each token belongs to (-1 for special tokens and punctuation), by the token's first character."""
    owners, w = [], 0
    for (start, end), is_special in zip(offsets, special, strict=True):
        if is_special or end <= start:
            owners.append(-1)
            continue
        while w < len(words) and words[w].end <= start:
            w += 1
        owners.append(w if w < len(words) and words[w].start <= start else -1)
    return owners


def integrated_gradients(
    loaded: LoadedClassifier, text: str, other_label: str | None = None, n_steps: int = IG_STEPS
) -> Explanation:
    """captum's layer integrated gradients on the word embeddings of an fp32 ``TextClassifier``, summed per word.

    The predicted label and the other one are attributed in one ``attribute`` call (the input repeated once
    per label). :class:`ExplanationUnavailableError` for a model it cannot explain.
    """
    reason = integrated_gradients_unavailable(loaded)
    if reason is not None:
        raise ExplanationUnavailableError(reason)
    from captum.attr import LayerIntegratedGradients

    other = label_index(loaded, other_label) if other_label is not None else None
    model = loaded.torch_model
    encoded = encode_with_offsets(loaded, text, return_tensors="pt")
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    special = encoded["special_tokens_mask"].bool()
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    baseline = torch.where(special, input_ids, torch.full_like(input_ids, pad_id))

    def label_log_odds(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return log_odds(model(input_ids=ids, attention_mask=mask)["logits"])

    with torch.no_grad():
        probabilities = torch.softmax(model(input_ids=input_ids, attention_mask=attention_mask)["logits"][0], dim=-1)
    words = split_words(text)
    owners = _token_words(encoded["offset_mapping"][0].tolist(), special[0].tolist(), words)

    def scores_for(targets: list[int]) -> list[list[float]]:
        n = len(targets)
        attribution = LayerIntegratedGradients(label_log_odds, model.encoder.get_input_embeddings())
        with torch.enable_grad():
            per_token = attribution.attribute(
                input_ids.repeat(n, 1),
                baselines=baseline.repeat(n, 1),
                target=targets,
                additional_forward_args=(attention_mask.repeat(n, 1),),
                n_steps=n_steps,
            )
        token_scores = per_token.detach().sum(dim=-1)  # (labels, tokens): each token's share of the attribution
        out = []
        for row in token_scores.tolist():
            per_word = [0.0] * len(words)
            for owner, value in zip(owners, row, strict=True):
                if owner >= 0:
                    per_word[owner] += value
            out.append(per_word)
        return out

    return _explanation(loaded, text, "integrated_gradients", words, probabilities, other, scores_for)


# ------------------------------------------------------------------------------------------ the entry point


def explain_text(
    loaded: LoadedClassifier, text: str, method: str = "occlusion", other_label: str | None = None
) -> Explanation:
    """One text explained by an offered method: ValueError for an empty text, an unknown method or label;
    :class:`ExplanationUnavailableError` (a ValueError) when the method cannot explain this model."""
    if not text.strip():
        raise ValueError("text is empty or only whitespace")
    if method not in OFFERED_METHODS:
        raise ValueError(f"unknown explanation method {method!r}; offered: {', '.join(OFFERED_METHODS)}")
    if method == "integrated_gradients":
        return integrated_gradients(loaded, text, other_label)
    return occlusion(loaded, text, other_label)


# ------------------------------------------------------------------------------------------ faithfulness


def top_ranking(scores: Sequence[float], visible: int) -> list[int]:
    """The read words' indices, the highest score first (ties: the earlier word)."""
    return sorted(range(visible), key=lambda i: (-scores[i], i))


def random_ranking(visible: int, rng: random.Random) -> list[int]:
    """The read words' indices in a random order (the baseline every method must beat)."""
    return rng.sample(range(visible), visible)


def deletion_drops(
    loaded: LoadedClassifier,
    texts: Sequence[str],
    rankings: Sequence[Sequence[int]],
    targets: Sequence[int],
    ks: Sequence[int] = (1, 2, 3, 4, 5),
) -> np.ndarray:
    """Comprehensiveness: for each text and k, how much ``target``'s probability drops when the first k words of
    its ranking are deleted (all of them when it has fewer than k), shape (texts, len(ks)); one model call.

    The mean over ks of a row is the text's AOPC (area over the perturbation curve)."""
    variants: list[str] = []
    for text, ranking in zip(texts, rankings, strict=True):
        words = split_words(text)
        variants.append(text)
        variants.extend(without_words(text, [words[i] for i in ranking[:k]]) for k in ks)
    probabilities = predict_proba(loaded, variants, batch_size=MANY_TEXTS_BATCH)
    width = len(ks) + 1
    rows = probabilities.view(len(texts), width, -1)
    index = torch.as_tensor(list(targets), dtype=torch.long)
    picked = rows[torch.arange(len(texts)), :, index]  # (texts, 1 + len(ks)): the target's probability
    return (picked[:, :1] - picked[:, 1:]).numpy()


def beats_random(method_aopc: np.ndarray, random_aopc: np.ndarray) -> bool:
    """The rule for offering a method: its per-text AOPC exceeds the random baseline's on the same texts by more
    than two standard errors of the paired difference (a method merely as good as chance is not offered)."""
    difference = np.asarray(method_aopc, dtype=float) - np.asarray(random_aopc, dtype=float)
    if difference.size < 2:
        return False
    standard_error = difference.std(ddof=1) / np.sqrt(difference.size)
    return bool(difference.mean() - 2.0 * standard_error > 0.0)


# ------------------------------------------------------------------------------------------ per-class summary


def influential_words(
    loaded: LoadedClassifier,
    texts: Sequence[str],
    label_ids: Sequence[int],
    *,
    per_class: int = 20,
    max_texts: int = 400,
    top: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The words whose deletion lowers each class's log-odds most, over a sample of that class's texts.

    Occlusion on at most ``per_class`` texts per class and ``max_texts`` in all (a seeded sample); a word's
    weight is its mean drop over the class's sampled texts (0 where it is absent), so a word that is both
    frequent and decisive in a class ranks first. One row per class that has texts:
    ``{"label", "texts", "words": [[word, weight], ...]}`` (lower-cased words, the ``top`` positive ones).
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for row, label in enumerate(label_ids):
        by_class[int(label)].append(row)
    quota = max(1, min(per_class, max_texts // max(1, len(by_class))))
    rng = random.Random(seed)
    chosen = {label: sorted(rng.sample(rows, min(quota, len(rows)))) for label, rows in sorted(by_class.items())}
    order = [(label, row) for label, rows in chosen.items() for row in rows]
    occluded = occlude(loaded, [texts[row] for _, row in order], batch_size=MANY_TEXTS_BATCH)
    totals: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (label, _), item in zip(order, occluded, strict=True):
        for word, drop in zip(item.words, item.drops(label), strict=True):
            totals[label][word.text.lower()] += drop
    summary = []
    for label, rows in chosen.items():
        weights = sorted(((w, s / len(rows)) for w, s in totals[label].items() if s > 0), key=lambda p: (-p[1], p[0]))
        summary.append(
            {
                "label": loaded.label_names[label],
                "texts": len(rows),
                "words": [[w, round(s, 4)] for w, s in weights[:top]],
            }
        )
    return summary


def validation_influential_words(
    model_dir: str | Path, dataset_path: str | Path, dataset_labels: Sequence[str], **options: Any
) -> list[dict[str, Any]]:
    """:func:`influential_words` of a model folder over the validation split of an ingested dataset (whose label
    ids index ``dataset_labels``); an empty list when the dataset has no validation texts."""
    from datasets import load_from_disk

    from domainflow.modeling import load_classifier

    validation = load_from_disk(str(dataset_path))["validation"]
    if len(validation) == 0:
        return []
    loaded = load_classifier(model_dir)
    ids = [label_index(loaded, dataset_labels[int(i)]) for i in validation["label"]]
    return influential_words(loaded, list(validation["text"]), ids, **options)


def influential_words_table(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The summary as table rows (Prefect's table artifact): label, texts, the words with their weights."""
    return [
        {
            "label": row["label"],
            "texts": row["texts"],
            "words": ", ".join(f"{word} ({weight:.3f})" for word, weight in row["words"]) or "–",
        }
        for row in summary
    ]


def influential_words_lines(summary: Sequence[dict[str, Any]], candidate: str) -> list[str]:
    """The model card's section (empty when there is nothing to show)."""
    if not summary:
        return []
    texts = sum(row["texts"] for row in summary)
    lines = [
        "## Most influential words per class (validation)",
        f"Occlusion on `{candidate}`, {texts} validation texts (at most {max(r['texts'] for r in summary)} per "
        "class): a word's weight is the mean drop of its class's log-odds when the word is deleted. "
        '`domainflow explain DOMAIN "text"` explains one prediction.',
        "",
        "| label | texts | words |",
        "|---|---|---|",
    ]
    lines += [f"| {row['label']} | {row['texts']} | {row['words']} |" for row in influential_words_table(summary)]
    return [*lines, ""]


# ------------------------------------------------------------------------------------------ terminal


def render_explanation(explanation: Explanation) -> Text:
    """The text with each word shaded by its score (green: it supports the label, red: it speaks against it;
    the deeper, the stronger), for the predicted label and, when asked, the other one."""
    from rich.text import Text

    out = Text()
    shadings = [(explanation.label, explanation.score, explanation.scores)]
    if explanation.other_label is not None and explanation.other_scores is not None:
        shadings.append((explanation.other_label, explanation.other_score or 0.0, explanation.other_scores))
    for label, probability, scores in shadings:
        out.append(f"{label} (p = {probability:.3f}); {explanation.method}, log-odds per word:\n", style="bold")
        largest = max((abs(s) for s in scores), default=0.0) or 1.0
        position = 0
        for word, score in zip(explanation.words, scores, strict=True):
            out.append(explanation.text[position : word.start])
            strength = min(1.0, abs(score) / largest)
            shade = int(255 * (1.0 - 0.75 * strength))
            colour = f"rgb({shade},255,{shade})" if score >= 0 else f"rgb(255,{shade},{shade})"
            out.append(word.text, style=f"black on {colour}")
            position = word.end
        out.append(explanation.text[position:] + "\n")
        strongest = sorted(zip(explanation.words, scores, strict=True), key=lambda p: -abs(p[1]))[:5]
        out.append("  " + ", ".join(f"{w.text} {s:+.3f}" for w, s in strongest) + "\n")
    return out
