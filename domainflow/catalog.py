"""The catalog of domains: every way a domain becomes known, in one place.

Where domains come from, later sources replacing earlier ones of the same name:

1. the entry-point group ``domainflow.domains`` (the shipped domains use it too, so the core
   knows none of them by name): each entry point loads to a domain spec, a domain file path, or
   a callable / iterable giving those;
2. Python modules named by ``DOMAINFLOW_DOMAIN_MODULES`` (comma-separated; the CLI's
   ``--domain-module`` sets it, so child processes such as scheduled runs inherit it): a module
   either calls :func:`register` on import or exposes ``DOMAINS`` (specs or file paths);
3. domain files recorded under the home by ``domainflow domains add`` (``<home>/domains/*.json``);
4. a domain file given directly: any command's DOMAIN may be a path to a ``.toml`` file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from domainflow import settings
from domainflow.domain_files import DomainFileError, load_domain_file, looks_like_domain_file
from domainflow.spec import DomainSpec

ENTRY_POINT_GROUP = "domainflow.domains"
MODULES_ENV = "DOMAINFLOW_DOMAIN_MODULES"


class UnknownDomainError(KeyError):
    """A domain name nobody registered (the message lists the known ones)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown domain"


@dataclass(frozen=True)
class Entry:
    spec: DomainSpec
    origin: str  # where it came from, for `domainflow domains`


_registered: dict[str, Entry] = {}  # filled by register() while modules import


def register(spec: DomainSpec, origin: str = "module") -> DomainSpec:
    """Make a spec known by name in this process (Python domain modules call it on import)."""
    _registered[spec.name] = Entry(spec, origin)
    return spec


def added_domains_dir() -> Path:
    return settings.home() / "domains"


def domain_modules() -> list[str]:
    return [name.strip() for name in os.environ.get(MODULES_ENV, "").split(",") if name.strip()]


def add_domain_modules(modules: Iterable[str]) -> None:
    """Import modules that define domains, then record them in the environment, so this process and
    its children (scheduled runs) know them too. A module that cannot be imported is an error naming
    it, and nothing is recorded."""
    new = [module for module in modules if module not in domain_modules()]
    for module in new:
        try:
            import_module(module)
        except ImportError as exc:
            raise DomainFileError(
                f"cannot import domain module {module!r} (from --domain-module / {MODULES_ENV}): {exc}"
            ) from None
    if new:
        os.environ[MODULES_ENV] = ",".join(domain_modules() + new)


def catalog() -> dict[str, Entry]:
    """Every known domain by name (read afresh: a domain added by another process shows at once)."""
    entries: dict[str, Entry] = {}
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        for spec in _specs_of(point.load(), f"entry point {point.value}"):
            entries[spec.name] = Entry(spec, f"entry point {point.name}")
    for module in domain_modules():
        try:
            loaded = import_module(module)
        except ImportError as exc:
            raise DomainFileError(
                f"cannot import domain module {module!r} (from --domain-module / {MODULES_ENV}): {exc}"
            ) from None
        for spec in _specs_of(getattr(loaded, "DOMAINS", ()), f"module {module}"):
            entries[spec.name] = Entry(spec, f"module {module}")
    entries.update(_registered)
    for record in sorted(added_domains_dir().glob("*.json")):
        path = Path(json.loads(record.read_text())["file"])
        if not path.is_file():
            raise DomainFileError(
                f"domain {record.stem!r} was added from {path}, which no longer exists; add it again or remove {record}"
            )
        spec = load_domain_file(path)
        entries[spec.name] = Entry(spec, f"file {path}")
    return entries


def _specs_of(value: Any, where: str) -> list[DomainSpec]:
    """Specs from an entry point's or module's object: a spec, a path, or a callable / iterable of them."""
    if callable(value) and not isinstance(value, type):
        value = value()
    items = [value] if isinstance(value, (DomainSpec, str, Path)) else list(value)
    specs = []
    for item in items:
        if isinstance(item, DomainSpec):
            specs.append(item)
        elif isinstance(item, (str, Path)):
            specs.append(load_domain_file(item))
        else:
            raise DomainFileError(f"{where} gave {item!r}: expected a DomainSpec or a domain file path")
    return specs


def get_domain(name_or_file: str) -> DomainSpec:
    """A domain by name, or the domain a ``.toml`` file describes."""
    if looks_like_domain_file(name_or_file) and Path(name_or_file).expanduser().exists():
        return load_domain_file(name_or_file)
    entries = catalog()
    if name_or_file in entries:
        return entries[name_or_file].spec
    if looks_like_domain_file(name_or_file):
        raise DomainFileError(f"{name_or_file}: no such domain file")
    known = ", ".join(sorted(entries)) or "none"
    raise UnknownDomainError(
        f"unknown domain {name_or_file!r}; known domains: {known} (or give a domain file: path/to/domain.toml)"
    )


def list_domains() -> list[str]:
    return sorted(catalog())


def add_domain_file(path: str | Path, *, replace: bool = False) -> DomainSpec:
    """Record a domain file under the home, so every command and scheduled run knows it by name.

    The file is recorded by its absolute path, not copied: its data files are relative to it, and
    an edit to it is seen by the next run. A name taken by another domain is refused unless ``replace``.
    """
    path = Path(path).expanduser().resolve()
    spec = load_domain_file(path)
    current = catalog().get(spec.name)
    if current is not None and current.origin != f"file {path}" and not replace:
        raise DomainFileError(
            f"a domain named {spec.name!r} is known already ({current.origin}); rename yours or pass --replace"
        )
    folder = added_domains_dir()
    folder.mkdir(parents=True, exist_ok=True)
    record = {"file": str(path), "added_at": datetime.now(UTC).isoformat(timespec="seconds")}
    temporary = folder / f".{spec.name}.json.tmp"
    temporary.write_text(json.dumps(record, indent=2))
    temporary.replace(folder / f"{spec.name}.json")
    return spec


def remove_domain(name: str) -> Path:
    """Forget a domain added with :func:`add_domain_file` (its file, models and registry stay)."""
    record = added_domains_dir() / f"{name}.json"
    if not record.exists():
        raise UnknownDomainError(
            f"{name!r} was not added with `domainflow domains add` (only such domains can be removed)"
        )
    path = Path(json.loads(record.read_text())["file"])
    record.unlink()
    return path
