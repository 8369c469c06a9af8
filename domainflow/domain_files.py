"""Domain files: a TOML file is a whole domain.

Why TOML: Python reads it with the standard library (``tomllib``, no new dependency), it has
comments, and its types are explicit (``"0.5"`` is a string, ``0.5`` a number, ``no`` is not a
boolean), so a domain file means what it says. Every key is a field of the kind's spec
(:mod:`domainflow.spec`, :mod:`domainflow.recsys.spec`); a misspelt key is an error.

Three keys are the loader's own, not spec fields:

* ``labels_file`` — the labels in id order, a JSON list or one per line;
* ``answers.replies_file`` — a CSV with columns ``label,reply``;
* ``spec_class`` — ``"module:Class"``, a subclass of the kind's spec for custom behaviour.

Relative paths (data files, labels and replies files) are resolved against the file's folder.
"""

from __future__ import annotations

import csv
import importlib
import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from domainflow.kinds import UnknownKindError, kind_of
from domainflow.spec import DomainSpec

SUFFIXES = (".toml",)


class DomainFileError(ValueError):
    """A domain file that cannot be read or does not describe a valid domain."""


def looks_like_domain_file(value: str) -> bool:
    return value.endswith(SUFFIXES) or "/" in value


def load_domain_file(path: str | Path) -> DomainSpec:
    """Read and validate a domain file; errors name the file and the field."""
    path = Path(path).expanduser().resolve()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DomainFileError(f"{path}: no such domain file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DomainFileError(f"{path}: not valid TOML: {exc}") from None
    try:
        return spec_from_file_data(data, path.parent)
    except DomainFileError as exc:
        raise DomainFileError(f"{path}: {exc}") from None


def spec_from_file_data(data: dict[str, Any], folder: Path) -> DomainSpec:
    """The spec a domain file's parsed ``data`` describes; ``folder`` anchors its relative paths."""
    data = dict(data)
    source = dict(data.get("source", {}))
    source.setdefault("base_dir", str(folder))
    data["source"] = source
    if "labels_file" in data:
        data["labels"] = _read_labels(folder / data.pop("labels_file"))
    answers = dict(data.get("answers", {}))
    if answers.get("replies_file"):
        answers["replies"] = {**_read_replies(folder / answers["replies_file"]), **answers.get("replies", {})}
        data["answers"] = answers
    spec_class = data.pop("spec_class", None)
    try:
        kind = kind_of(str(data.get("task_kind", "text_classification")))
    except UnknownKindError as exc:
        raise DomainFileError(str(exc)) from None
    spec_type = _import_spec_class(spec_class, kind.spec_type) if spec_class else kind.spec_type
    try:
        return spec_type.model_validate(data)
    except ValidationError as exc:
        raise DomainFileError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: the field's dotted path, what is wrong, and the value found."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        found = (
            f" (found {error['input']!r})"
            if error["type"] not in {"missing"} and not isinstance(error.get("input"), dict)
            else ""
        )
        lines.append(f"  {where}: {error['msg']}{found}")
    return f"{exc.error_count()} problem(s):\n" + "\n".join(lines)


def _read_labels(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DomainFileError(f"labels_file {path} does not exist") from None
    if path.suffix == ".json":
        labels = json.loads(text)
        if not isinstance(labels, list):
            raise DomainFileError(f"labels_file {path}: expected a JSON list of names")
        return [str(label) for label in labels]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_replies(path: Path) -> dict[str, str]:
    """``label,reply`` rows; a label given twice or an empty reply is an error naming the line."""
    try:
        handle = open(path, newline="", encoding="utf-8")
    except FileNotFoundError:
        raise DomainFileError(f"answers.replies_file {path} does not exist") from None
    replies: dict[str, str] = {}
    with handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"label", "reply"} <= set(reader.fieldnames):
            raise DomainFileError(
                f"answers.replies_file {path}: the header must name columns 'label' and 'reply' (found "
                f"{reader.fieldnames})"
            )
        for line, row in enumerate(reader, start=2):
            label, reply = (row["label"] or "").strip(), (row["reply"] or "").strip()
            if not label or not reply:
                raise DomainFileError(f"answers.replies_file {path}, line {line}: empty label or reply")
            if label in replies:
                raise DomainFileError(f"answers.replies_file {path}, line {line}: label {label!r} has a reply already")
            replies[label] = reply
    return replies


def _import_spec_class(reference: str, base: type[DomainSpec]) -> type[DomainSpec]:
    module, _, name = str(reference).partition(":")
    try:
        spec_type = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise DomainFileError(f"spec_class {reference!r} cannot be imported: {exc}") from None
    if not (isinstance(spec_type, type) and issubclass(spec_type, base)):
        raise DomainFileError(f"spec_class {reference!r} is not a subclass of {base.__name__}")
    return spec_type


def field_rows(spec_type: type[DomainSpec]) -> list[tuple[str, str, str]]:
    """(key, default, help) of every field a domain file of this spec type may set; tables as ``[table] key``.

    The README's field list and ``domainflow domains fields`` are made from this, so they cannot drift
    from the code.
    """
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            if name == "base_dir":
                continue  # set by the loader
            key = info.alias or name
            annotation = info.annotation
            nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
            if nested is None:  # `X | None` of a record
                nested = next(
                    (
                        a
                        for a in getattr(annotation, "__args__", ())
                        if isinstance(a, type) and issubclass(a, BaseModel)
                    ),
                    None,
                )
            if nested is not None:
                rows.append((f"[{prefix}{key}]", "" if info.default_factory else "absent", info.description or ""))
                walk(nested, f"{prefix}{key}.")
                continue
            if info.default is PydanticUndefined and info.default_factory is None:
                default = "required"
            else:
                value = info.default_factory() if info.default_factory else info.default  # type: ignore[call-arg]
                default = json.dumps(list(value) if isinstance(value, tuple) else value)
            rows.append((f"{prefix}{key}", default, info.description or ""))

    walk(spec_type, "")
    extras = [
        ("labels_file", "absent", "the labels in id order, a JSON list or one per line (instead of labels)"),
        ("spec_class", "absent", '"module:Class", a subclass of the kind\'s spec adding behaviour (Python hook)'),
    ]
    return rows + extras
