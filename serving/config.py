"""Limits and knobs of the prediction service, in one frozen record.

Why a record and not module constants: tests and ``domainflow serve`` build several apps with
different limits (a batcher with a long wait to force batching, a tight text limit), and the
app factory must not read global state for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from domainflow import settings


@dataclass(frozen=True)
class ServingConfig:
    """What the service accepts and how it batches.

    * ``max_texts`` / ``max_chars``: per request, a batch of at most this many texts of at most this
      many characters each. The model truncates to its ``max_length`` tokens anyway; the character
      cap keeps one request from monopolising the tokenizer (a 10 MB "text" costs real CPU).
    * ``max_top_k``: the most labels a caller may ask for per text.
    * ``max_batch_texts`` / ``max_wait_ms``: the micro-batcher sends at most this many texts to the
      model at once, and waits at most this long after the oldest queued request for others to join.
    * ``max_queued_texts``: the backlog each domain may hold, in texts (a ``/rank`` request counts 1:
      its cost is one pass of the user tower over one rendered history; scoring even 5,000 candidates
      is a matrix-vector product). A request that would take it over is answered 503 + Retry-After at
      once. Counted in texts because the model's cost is per text: 4,096 queued *requests* could be
      262,144 texts, minutes of work. Per domain, not per service, so that a flood on one domain fills
      only its own queue; the single inference thread alternates between domains (see
      :mod:`serving.batching`). The default, 2,048, is about 2.4 s of work for the int8 champion on
      2 cores (868 texts/s at batch 32), in line with the deadline below.
    * ``request_deadline_ms``: a request still queued this long after it arrived is dropped and answered
      503 + Retry-After rather than run late (its client has likely given up); one already in a model
      call is answered.
    * ``poll_seconds``: how often champion.json is checked for a new champion.
    * ``retry_failed_load_seconds``: a champion that failed to load is retried after this long even
      if the pointer did not change (a transient I/O error should not need a restart).
    * ``protect_operational``: ``/metrics``, ``/docs``, ``/redoc`` and ``/openapi.json`` need the API key,
      and ``/readyz`` names domains and versions only to a caller with one. On by default: they tell
      anyone who can reach the port which domains are served, at which version, with how much traffic,
      and the service already demands a key for ``/v1``. Off for a scrape on a trusted network that
      cannot send credentials. ``/healthz`` is always open and says nothing but "ok".
    * ``share_base_encoders``: a champion that is an adapter (LoRA, IA3) is served unmerged on its base encoder,
      loaded once for every domain on that base (:mod:`domainflow.shared_bases`): memory for one base plus each
      domain's adapter and head, instead of one full model per domain. Off: each adapter is merged into a copy
      of its own, which answers a little faster (no adapter work per call).
    """

    registry_root: Path = field(default_factory=settings.registry_dir)
    domains: tuple[str, ...] | None = None  # None: every registered domain
    max_texts: int = 64
    max_chars: int = 2000
    max_top_k: int = 20
    max_batch_texts: int = 64
    max_wait_ms: float = 5.0
    max_queued_texts: int = 2048
    request_deadline_ms: float = 2000.0
    poll_seconds: float = 1.0
    retry_failed_load_seconds: float = 30.0
    protect_operational: bool = True
    share_base_encoders: bool = True

    def __post_init__(self) -> None:
        for name in ("max_texts", "max_chars", "max_top_k", "max_batch_texts", "max_queued_texts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queued_texts < self.max_texts:  # else a valid request of max_texts texts could never be admitted
            raise ValueError(
                f"max_queued_texts ({self.max_queued_texts}) must be at least max_texts ({self.max_texts})"
            )
        if self.request_deadline_ms <= 0:
            raise ValueError(f"request_deadline_ms must be > 0, got {self.request_deadline_ms}")
        if self.max_wait_ms < 0 or self.poll_seconds <= 0:
            raise ValueError("max_wait_ms must be >= 0 and poll_seconds > 0")
        object.__setattr__(self, "registry_root", Path(self.registry_root).expanduser().resolve())

    @property
    def max_body_bytes(self) -> int:
        """The largest request body worth parsing: every text at its limit, 4 bytes a character
        in UTF-8 (6 for a JSON ``\\uXXXX`` escape), plus room for the JSON around them."""
        return self.max_texts * (self.max_chars * 6 + 16) + 4096
