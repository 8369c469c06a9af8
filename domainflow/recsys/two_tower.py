"""The text model: one MiniLM encoder as user tower (history text) and item tower (item text).

Both towers mean-pool and L2-normalise, so score(user, item) = cosine similarity and every
catalogue item is scored by one matrix product against precomputed item vectors. Training is
InfoNCE with in-batch negatives: for each (history, next positive item) pair, the other items
of the batch are the negatives, and the loss is the cross-entropy of picking the right item at
``temperature``. A batch that holds the same item twice would teach the model to push an item
away from itself, so such duplicate columns are masked out of each row's negatives.

Why a shared encoder: half the parameters to train and store, and on 2 CPU cores the cost of a
step is the encoder's forward and backward passes, not the number of towers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from domainflow.modeling import mean_pool, padded_batches

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class TwoTower(nn.Module):
    """A transformer encoder whose mean-pooled, L2-normalised output embeds both users and items."""

    def __init__(self, encoder: PreTrainedModel) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)


@dataclass(frozen=True)
class Pair:
    """One training example: the history before an interaction, and the item interacted with."""

    history: str
    item: int


def training_pairs(
    histories: Sequence[Sequence[int]],
    positives: Sequence[Sequence[bool]],
    item_texts: Sequence[str],
    render: Any,
    *,
    pairs_per_user: int,
    max_pairs: int,
    seed: int,
) -> list[Pair]:
    """(history text, next positive item) pairs: each user's most recent ``pairs_per_user`` positives
    that have at least one interaction before them, then a seeded sample of ``max_pairs``.

    Why the most recent: evaluation asks for a user's *next* item after a long history, so late
    positions look most like it; capping per user keeps heavy users from dominating.
    """
    pairs: list[Pair] = []
    for history, flags in zip(histories, positives, strict=True):
        positions = [t for t in range(1, len(history)) if flags[t]][-pairs_per_user:]
        for t in positions:
            pairs.append(Pair(render([item_texts[i] for i in history[:t]]), int(history[t])))
    if len(pairs) > max_pairs:
        keep = np.random.default_rng(seed).choice(len(pairs), size=max_pairs, replace=False)
        pairs = [pairs[i] for i in sorted(keep)]
    return pairs


def info_nce(
    users: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    temperature: float,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each user picking its own item among the batch's items (duplicates masked).

    ``log_q``: log of each batch item's frequency as a training target. In-batch negatives are
    drawn in proportion to popularity, so without a correction the model learns to push popular
    items away from everyone; subtracting log q from the logits (the "logQ correction" of Yi et
    al., RecSys 2019) makes the loss estimate a full softmax, and scores at serving time keep
    their popularity.
    """
    logits = users @ items.T / temperature
    if log_q is not None:
        logits = logits - log_q[None, :]
    same = item_ids[:, None] == item_ids[None, :]
    duplicate = same & ~torch.eye(len(item_ids), dtype=torch.bool)
    logits = logits.masked_fill(duplicate, float("-inf"))
    return nn.functional.cross_entropy(logits, torch.arange(len(item_ids)))


@dataclass
class TrainResult:
    losses: list[float]  # one per step
    seconds: float
    steps: int


def train_two_tower(
    model: TwoTower,
    tokenizer: Any,
    pairs: Sequence[Pair],
    item_texts: Sequence[str],
    *,
    epochs: float,
    batch_size: int,
    learning_rate: float,
    temperature: float,
    warmup_ratio: float,
    history_max_length: int,
    item_max_length: int,
    seed: int,
    log_q_correction: bool = True,
    log: Any = None,
) -> TrainResult:
    """AdamW with linear warm-up and decay over ``epochs`` passes of shuffled batches."""
    if not pairs:
        raise ValueError("no training pairs: every user needs an interaction before a positive")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(pairs) / batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    warmup = int(warmup_ratio * total)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    counts = np.bincount([p.item for p in pairs], minlength=len(item_texts)).astype(np.float64)
    log_q = torch.as_tensor(np.log(np.maximum(counts, 1.0) / len(pairs)), dtype=torch.float32)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    order: list[int] = []
    for step in range(total):
        if len(order) < batch_size:
            order += rng.permutation(len(pairs)).tolist()
        batch, order = [pairs[i] for i in order[:batch_size]], order[batch_size:]
        histories = tokenizer(
            [p.history for p in batch],
            padding=True,
            truncation=True,
            max_length=history_max_length,
            return_tensors="pt",
        )
        items = tokenizer(
            [item_texts[p.item] for p in batch],
            padding=True,
            truncation=True,
            max_length=item_max_length,
            return_tensors="pt",
        )
        item_ids = torch.tensor([p.item for p in batch])
        users, targets = (
            model(histories["input_ids"], histories["attention_mask"]),
            model(items["input_ids"], items["attention_mask"]),
        )
        loss = info_nce(users, targets, item_ids, temperature, log_q[item_ids] if log_q_correction else None)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % 10 == 0:
            log.info(
                "two-tower step %d/%d: loss %.4f (%.0f s)",
                step + 1,
                total,
                float(np.mean(losses[-10:])),
                time.perf_counter() - started,
            )
    model.eval()
    return TrainResult(losses=losses, seconds=time.perf_counter() - started, steps=total)


@torch.inference_mode()
def encode(model: TwoTower, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Embeddings (float32, L2-normalised) of ``texts`` in their order, batched by length."""
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    if not texts:
        return out
    model.eval()
    for index, input_ids, attention_mask in padded_batches(tokenizer, texts, max_length, batch_size):
        out[index] = model(input_ids, attention_mask).float().numpy()
    return out
