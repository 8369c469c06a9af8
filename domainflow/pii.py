"""Personal data in texts: found with well-kept libraries and replaced by typed placeholders.

Why: customers write their e-mail address, phone number, card number or IBAN into a message, and a
domain trains on those messages. Unfiltered, the values would land in the dataset folder, run folders,
Prefect logs and artifacts, the retrieval index shipped with every champion (and returned as
``nearest_question``), the monitoring store and the service's logs. A domain's ``pii`` setting decides what
happens to them (``"off"``, ``"mask"``, ``"reject"``), at ingest before anything is written and in serving
before a text goes anywhere; this module only finds and replaces.

What is found, and by what:

* ``<EMAIL>``: an address pattern (a local part, ``@``, a dotted domain ending in a 2+ letter top-level
  domain); an e-mail address has no checksum, so a pattern is all any library does here;
* ``<IBAN>``: a country code and check digits followed by letters and digits, kept only when python-stdnum's
  ``stdnum.iban`` accepts it (the country's length and format, and the ISO 7064 mod-97 check);
* ``<CARD_NUMBER>``: 13 to 19 digits not starting with 0 (single spaces or dashes between groups) kept only
  when python-stdnum's ``stdnum.luhn`` accepts them: a Luhn-invalid 16-digit number is not a card number (an
  order reference, a tracking number) and stays;
* ``<ACCOUNT_NUMBER>``: 6 to 20 digits right after "account", "acct" or "a/c" (with "number", "no"… between):
  a bank account number has no checksum that tells it from any other number, so its context says what it is;
* ``<PHONE_NUMBER>``: Google's libphonenumber (``phonenumbers.PhoneNumberMatcher``) for numbers written with an
  international prefix, or in the national format of a region in :data:`PHONE_REGIONS`. Leniency
  STRICT_GROUPING: a number the region's plan allows, its digits grouped as the region writes them (or not
  grouped at all); VALID alone took the price range "3107.50-3108" of a financial tweet for a US number.

They run in that order, each on the text the previous ones left, so a number is masked once, by the most
specific kind: the digits of an IBAN are not also a card number, a card number not also a phone number.
Placeholders hold no digit and no ``@``, so no later detector can match inside one.

Why not presidio-analyzer (measured, see the README's privacy section): its pattern recognizers run without
an NLP model, but importing them imports spaCy (about 190 MB installed with thinc and blis, +2.3 s of
import in every ingest and every service start), its e-mail check asks tldextract for the public suffix list
over the network, and its card and IBAN checks are its own code; the two libraries here cover the same
ground in 55 MB and 0.07 s of import.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import phonenumbers  # dependencies of domainflow itself: every classification domain masks by default
import stdnum
from stdnum import iban, luhn

from domainflow.data.problems import MAX_LISTED, DataValidationError

__all__ = [
    "KINDS",
    "PHONE_REGIONS",
    "Masked",
    "PiiMode",
    "PiiRejectedError",
    "Protected",
    "detector_version",
    "mask",
    "placeholder",
    "protect",
]

#: What a domain does with personal data in its texts (the ``pii`` setting of a classification domain).
PiiMode = Literal["off", "mask", "reject"]

#: The kinds found, in the order they are looked for (most specific first).
KINDS = ("EMAIL", "IBAN", "CARD_NUMBER", "ACCOUNT_NUMBER", "PHONE_NUMBER")

#: Regions whose national phone formats are recognised (a number with an international prefix is found
#: whatever its country). Why these two: the shipped domains' customers write British (Banking77) and US
#: (financial news) numbers; every region added is one more pass over texts with enough digits and more
#: stray digit runs taken for numbers (Germany's plan, for one, accepts five-digit numbers like "16949").
PHONE_REGIONS = ("GB", "US")

_EMAIL = re.compile(r"(?<![\w.+'-])[\w.+'-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}(?![\w-])")
# A country code and check digits, then letters/digits in groups (a space or dash between groups). The
# trailing groups are tried shorter and shorter, since a word after an IBAN matches the pattern as well.
_IBAN = re.compile(r"(?<![\w])[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]+)+")
# Digit groups with one space or dash between them, not inside a word or a decimal number.
_DIGIT_RUN = re.compile(r"(?<![\w.,])\d+(?:[ -]\d+)*(?![\w]|[.,]\d)")
_ACCOUNT = re.compile(
    r"\b(?:account|acct|acc|a/c)\b(?:\s*(?:number|num|no|nr|#))?\.?\s*(?:is\s+|:\s*|#\s*|=\s*)?"
    r"(?P<number>\d(?:[ -]?\d){5,19})(?![\w]|[.,]\d)",
    re.IGNORECASE,
)
_SEPARATORS = re.compile(r"[ -]")
_DIGITS = re.compile(r"\d+")
_CARD_DIGITS = range(13, 20)
_MIN_CARD_GROUP = 3
_IBAN_LENGTH = range(15, 35)  # Norway's are the shortest, Saint Lucia's the longest
_MIN_PHONE_DIGITS = 7


def placeholder(kind: str) -> str:
    """What replaces a value of ``kind``: ``<CARD_NUMBER>``."""
    return f"<{kind}>"


def detector_version() -> str:
    """The libraries whose data decides what is found (phone numbering plans change with every release): part
    of the ingest cache key, so a dataset masked by other rules is not reused."""
    return f"phonenumbers {phonenumbers.__version__}; python-stdnum {stdnum.__version__}; regions {PHONE_REGIONS}"


Span = tuple[int, int]


def _email_spans(text: str) -> list[Span]:
    if "@" not in text:
        return []
    return [match.span() for match in _EMAIL.finditer(text)]


def _iban_spans(text: str) -> list[Span]:
    spans: list[Span] = []
    for match in _IBAN.finditer(text):
        pieces = _SEPARATORS.split(match.group())
        for count in range(len(pieces), 0, -1):  # the longest run of groups that is a valid IBAN
            candidate = "".join(pieces[:count])
            if len(candidate) in _IBAN_LENGTH and iban.is_valid(candidate):
                length = len(" ".join(pieces[:count]))  # separators are one character, as matched
                spans.append((match.start(), match.start() + length))
                break
    return spans


def _card_spans(text: str) -> list[Span]:
    """In each run of digit groups, from the left: the longest consecutive groups holding 13-19 digits that pass
    Luhn (two cards written one after the other are two spans; a window never holds more than 19 digits, so a
    long run costs linear time). Every group of a card has 3 digits or more (4-4-4-4, Amex's 4-6-5, Diners'
    4-6-4, 19-digit 4-4-4-4-3): a window stops at a shorter group, which also spares "12 34 56 …" runs."""
    spans: list[Span] = []
    for match in _DIGIT_RUN.finditer(text):
        groups = [(match.start() + m.start(), match.start() + m.end()) for m in _DIGITS.finditer(match.group())]
        first = 0
        while first < len(groups):
            best, digits = None, ""
            if text[groups[first][0]] == "0":  # no card number starts with 0 (ISO/IEC 7812); "0044 …" is a phone
                first += 1
                continue
            for last in range(first, len(groups)):
                if groups[last][1] - groups[last][0] < _MIN_CARD_GROUP:
                    break
                digits += text[groups[last][0] : groups[last][1]]
                if len(digits) > _CARD_DIGITS[-1]:
                    break
                if len(digits) in _CARD_DIGITS and luhn.is_valid(digits):
                    best = last
            if best is None:
                first += 1
                continue
            spans.append((groups[first][0], groups[best][1]))
            first = best + 1
    return spans


def _account_spans(text: str) -> list[Span]:
    return [match.span("number") for match in _ACCOUNT.finditer(text)]


def _phone_finder(region: str) -> Callable[[str], list[Span]]:
    """Phone numbers as ``region`` writes them (and any with an international prefix).

    One finder per region, run one after the other like the other kinds: a number the first region found is
    masked before the next looks, which then usually has too few digits left to run at all (libphonenumber's
    matcher is the costliest detector by far: ~1.5 ms for a text holding a number, against microseconds)."""

    def find(text: str) -> list[Span]:
        if sum(character.isdigit() for character in text) < _MIN_PHONE_DIGITS:
            return []
        matcher = phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.STRICT_GROUPING)
        return [(match.start, match.end) for match in matcher]

    return find


def _without_overlaps(spans: list[Span]) -> list[Span]:
    """Sorted spans, merged where two overlap (one pattern's matches, tried from several starts, can)."""
    kept: list[Span] = []
    for start, end in sorted(spans, key=lambda span: (span[0], -span[1])):
        if kept and start < kept[-1][1]:
            if end > kept[-1][1]:
                kept[-1] = (kept[-1][0], end)
            continue
        kept.append((start, end))
    return kept


_DETECTORS: tuple[tuple[str, Callable[[str], list[Span]]], ...] = (
    ("EMAIL", _email_spans),
    ("IBAN", _iban_spans),
    ("CARD_NUMBER", _card_spans),
    ("ACCOUNT_NUMBER", _account_spans),
    *(("PHONE_NUMBER", _phone_finder(region)) for region in PHONE_REGIONS),
)


@dataclass(frozen=True)
class Masked:
    """A text with its personal data replaced, and how many values of each kind were."""

    text: str
    counts: Mapping[str, int] = field(default_factory=dict)


def _worth_scanning(text: str) -> bool:
    """Every kind needs an ``@`` or at least six digits: most texts are let through after one cheap look."""
    return "@" in text or sum(character.isdigit() for character in text) >= 6


def mask(text: str) -> Masked:
    """``text`` with every value found replaced by its placeholder (see the module's docstring)."""
    if not _worth_scanning(text):
        return Masked(text)
    counts: Counter[str] = Counter()
    for kind, find in _DETECTORS:
        spans = _without_overlaps(find(text))
        if not spans:
            continue
        counts[kind] += len(spans)
        pieces, last = [], 0
        for start, end in spans:
            pieces += [text[last:start], placeholder(kind)]
            last = end
        text = "".join([*pieces, text[last:]])
    return Masked(text, dict(counts))


class PiiRejectedError(DataValidationError):
    """Personal data in a domain whose ``pii`` setting is ``"reject"``. The message says where and of which kind,
    never the value. A :class:`DataValidationError`: no retry can fix the data."""


@dataclass(frozen=True)
class Protected:
    """Texts as a domain's setting lets them through, and the values found per kind (none with ``"off"``)."""

    texts: list[str]
    counts: dict[str, int]


def protect(mode: PiiMode, texts: Sequence[str], where: Sequence[str], source: str, hint: str = "") -> Protected:
    """Apply a domain's ``pii`` setting to ``texts`` (non-text values pass as they are: validation reports them).

    ``"off"``: as given; ``"mask"``: masked, with counts; ``"reject"``: :class:`PiiRejectedError` when any text
    holds personal data, naming ``source`` and the ``where`` of each such text (e.g. ``line 12``) with the
    kinds found in it.
    """
    if mode == "off":
        return Protected(list(texts), {})
    counts: Counter[str] = Counter()
    out: list[str] = []
    flagged: list[str] = []
    for text, location in zip(texts, where, strict=True):
        if not isinstance(text, str):
            out.append(text)
            continue
        masked = mask(text)
        counts.update(masked.counts)
        out.append(masked.text)
        if masked.counts:
            flagged.append(f"{location} ({', '.join(kind for kind in KINDS if kind in masked.counts)})")
    if mode == "reject" and flagged:
        more = f"; … and {len(flagged) - MAX_LISTED} more" if len(flagged) > MAX_LISTED else ""
        raise PiiRejectedError(
            f'{source}: personal data in {len(flagged)} text(s), refused (pii = "reject"; values not shown): '
            f"{'; '.join(flagged[:MAX_LISTED])}{more}. "
            + (hint or 'Remove them, or set pii = "mask" to replace them by typed placeholders')
        )
    return Protected(out if mode == "mask" else list(texts), {kind: counts[kind] for kind in KINDS if counts[kind]})
