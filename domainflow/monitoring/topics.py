"""Topics of a text: the tickers it names ($AAPL) and the keyword topics it mentions.

Why both: a cashtag is the precise, cheap signal for single stocks, but macro news
("Fed signals more rate hikes") names no ticker; a keyword map per domain tags those.
Matching is on whole words, case-insensitively, so "oil" tags "Oil prices slump" but
not "turmoil", and "fed" does not tag "fedex".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

#: A cashtag: "$" then 1-6 letters, optionally a share-class suffix ($BRK.B); not preceded by a
#: word character or "$", so prices ("$5", "$1.2B") and "US$" are not tickers.
CASHTAG = re.compile(r"(?<![\w$])\$([A-Za-z]{1,6}(?:\.[A-Za-z]{1,2})?)(?![\w])")
TICKER_PREFIX = "$"


def cashtags(text: str) -> list[str]:
    """Tickers named in ``text`` as topics ('$AAPL'), upper-cased, first mention order, no repeats."""
    return list(dict.fromkeys(TICKER_PREFIX + match.upper() for match in CASHTAG.findall(text)))


def _phrase_pattern(words: Sequence[str]) -> re.Pattern[str]:
    """One regex per topic: any of its phrases as whole words; inner whitespace matches any run of spaces."""
    alternatives = sorted(
        {r"\s+".join(re.escape(part) for part in word.lower().split()) for word in words}, key=len, reverse=True
    )
    return re.compile(r"(?<![\w])(?:" + "|".join(alternatives) + r")(?![\w])", re.IGNORECASE)


@dataclass(frozen=True)
class TopicExtractor:
    """Tags texts with topics; built once per batch from a keyword map."""

    keywords: Mapping[str, Sequence[str]] = field(default_factory=dict)
    use_cashtags: bool = True

    @cached_property
    def _patterns(self) -> list[tuple[str, re.Pattern[str]]]:
        return [(topic.strip(), _phrase_pattern(words)) for topic, words in self.keywords.items()]

    def __call__(self, text: str) -> list[str]:
        """Tickers first (in order of mention), then keyword topics (in the map's order)."""
        topics = cashtags(text) if self.use_cashtags else []
        topics += [topic for topic, pattern in self._patterns if pattern.search(text)]
        return list(dict.fromkeys(topics))


def parse_given_topics(value: object) -> list[str]:
    """A topic cell given with the item: one topic, or several separated by '|' or ','; empty -> none."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    return list(dict.fromkeys(part.strip() for part in re.split(r"[|,]", str(value)) if part.strip()))


def topics_for(texts: Iterable[str], given: Iterable[object], extractor: TopicExtractor) -> list[list[str]]:
    """Per item: its given topics when it has any, else the ones derived from its text."""
    return [parse_given_topics(g) or extractor(text) for text, g in zip(texts, given, strict=False)]
