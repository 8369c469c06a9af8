"""Which labels a dataset has and how a raw label value maps to a class id.

Why two sources: a domain may list its labels (then a file may name a label or give its integer
id, as the public Banking77 and FinancialPhraseBank files do), or list none, and then the labels
are the distinct values of the training file, sorted so that the same data always gives the same
ids: numerically when every value is an integer (``2`` before ``10``), else as strings. Ids
derived from the data are never re-interpreted as positions: with inferred labels ``"3"`` is the
label named ``3``, and a test row whose label the training data lacks is an error, not a new class.
For the same reason a listed label named by an integer (``labels = ["1", "2", "10"]``) turns id
lookup off for that domain: ``0`` is then an unknown label, not silently the first one.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import pandas as pd

from domainflow.spec import DataSlice

_INTEGER = re.compile(r"-?\d+")
SHOWN_LABELS = 10  # labels quoted in a hint


def is_missing(value: Any) -> bool:
    """None, NA and NaN: what a reader gives for an absent value."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def label_name(value: Any) -> str | None:
    """The name a raw label value stands for when labels come from the data: a stripped string,
    or an integer's digits (``3``, ``3.0`` and ``"3"`` are one label); None for anything else."""
    if isinstance(value, bool) or is_missing(value):
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, numbers.Integral):  # Python and numpy integers
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


def sorted_labels(names: Iterable[str]) -> tuple[str, ...]:
    """Distinct names, numerically sorted when all are integers, else sorted as strings."""
    distinct = set(names)
    if distinct and all(_INTEGER.fullmatch(name) for name in distinct):
        return tuple(sorted(distinct, key=lambda name: (int(name), name)))
    return tuple(sorted(distinct))


@dataclass(frozen=True)
class Labels:
    """The label list of one ingest, and where it came from (``inferred_from``: the training file)."""

    names: tuple[str, ...]
    data: DataSlice
    inferred_from: str | None = None
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, data: DataSlice, train_values: Iterable[Any], train_name: str) -> Labels:
        """The slice's own labels, or (when it lists none) those found in the training values."""
        if data.label_names is not None:
            names = tuple(data.label_names)
            by_name = {name: i for i, name in enumerate(names)} if numeric_names(names) else {}
            return cls(names, data, None, by_name)
        names = sorted_labels(name for name in map(label_name, train_values) if name is not None)
        return cls(names, data, train_name, {name: i for i, name in enumerate(names)})

    @property
    def inferred(self) -> bool:
        return self.inferred_from is not None

    @property
    def ids_allowed(self) -> bool:
        """Whether a raw integer may be a position in the list: only for listed labels none of which is a number."""
        return not self.inferred and not self._index

    def index(self, value: Any) -> int | None:
        """The class id of a raw label value; None when it is not a label of this dataset."""
        if self.ids_allowed:
            return self.data.label_index(value)
        name = label_name(value)
        return None if name is None else self._index.get(name)

    def is_id(self, value: Any) -> bool:
        """Whether ``value`` was read as a position in the list (an integer id), not as a label's name."""
        if not self.ids_allowed or is_missing(value):
            return False
        name = value.strip() if isinstance(value, str) else None
        return name not in self.names and self.data.label_index(value) is not None

    def unknown_kind(self, is_train: bool) -> str:
        """How a label that does not map is described in the error."""
        if not self.inferred:
            return "unknown label"
        if is_train:
            return "unusable label (empty, or neither a name nor an integer)"
        return "label not in the training data"

    def hint(self, domain: str) -> str:
        """What the valid labels are, for the error that names a label that is not one."""
        if self.inferred:
            shown = ", ".join(repr(name) for name in self.names[:SHOWN_LABELS])
            more = f" … ({len(self.names)} in all)" if len(self.names) > SHOWN_LABELS else ""
            source = self.inferred_from
            return f"Domain {domain!r} lists no labels, so they are the values found in {source}: {shown}{more}"
        count, examples = len(self.names), ", ".join(repr(name) for name in self.names[:5])
        if not self.ids_allowed:
            return (
                f"Valid labels are the {count} names of domain {domain!r}, e.g. {examples}; its labels are named by "
                f"numbers, so a value is always read as a name, never as an id (a position in the list)"
            )
        return f"Valid labels are the {count} names of domain {domain!r} or their ids 0-{count - 1}, e.g. {examples}"


def numeric_names(names: Iterable[str]) -> bool:
    """Whether any label is named by an integer, which makes an integer value ambiguous between name and id."""
    return any(_INTEGER.fullmatch(str(name).strip()) for name in names)


def ids_to_names(values: Iterable[Any], names: Sequence[str]) -> list[Any]:
    """Integer ids turned into the names a file declares for them (a hub or Parquet ClassLabel).

    A negative id is the ``datasets`` convention for "no label" and becomes None (reported as a
    missing label); an id past the end becomes a marker that matches no label, so validation reports
    it instead of reading it as one of the domain's own ids; anything else is kept as it is.
    """
    out: list[Any] = []
    for value in values:
        if isinstance(value, float) and value.is_integer():  # an integer column with nulls is read as floats
            value = int(value)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            number = int(value)
            if 0 <= number < len(names):
                out.append(names[number])
            else:  # never let it reach the domain's own id lookup, where it could name another class
                out.append(None if number < 0 else f"<id {number}: no such class in the file's {len(names)}>")
        else:
            out.append(value)
    return out
