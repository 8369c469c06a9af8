"""The registry of task kinds: the one place that knows what a kind brings.

Each kind names its spec class, the flow that trains it, the loader that serves its champion,
the HTTP endpoint and the CLI verb that answer with it. Flows, serving and the CLI live above
the core, so they are named here as ``"module:attribute"`` strings and imported by the layer
that needs them (:func:`resolve`): the core imports none of them. Nothing outside this module
compares a kind by its name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from domainflow.recsys.spec import RankingSpec
from domainflow.spec import ClassificationSpec, DomainSpec


@dataclass(frozen=True)
class TaskKind:
    """What one task kind brings to each layer."""

    name: str
    spec_type: type[DomainSpec]
    flow: str  # "module:attribute" of the Prefect flow that trains a domain of this kind
    serving_loader: str  # "module:attribute" of the function that loads a champion for the service
    endpoint: str  # the HTTP verb under /v1/<domain>/
    cli_verb: str  # the CLI command that asks the champion
    usage: str  # how to ask a champion of this kind from the CLI ({domain} is filled in)


KINDS: dict[str, TaskKind] = {
    kind.name: kind
    for kind in (
        TaskKind(
            name="text_classification",
            spec_type=ClassificationSpec,
            flow="flows.pipeline:domain_pipeline",
            serving_loader="serving.model_store:load_served_model",
            endpoint="predict",
            cli_verb="predict",
            usage="domainflow predict {domain} TEXT ...",
        ),
        TaskKind(
            name="ranking",
            spec_type=RankingSpec,
            flow="flows.ranking:ranking_pipeline",
            serving_loader="serving.ranking:load_recommender",
            endpoint="rank",
            cli_verb="recommend",
            usage="domainflow recommend {domain} ITEM_ID ...",
        ),
    )
}


class UnknownKindError(ValueError):
    """A spec names a task kind nobody registered."""


def kind_of(spec_or_name: DomainSpec | str) -> TaskKind:
    """The kind of a spec (or a kind's name), with a clear error for an unknown one."""
    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.task_kind
    try:
        return KINDS[name]
    except KeyError:
        raise UnknownKindError(f"unknown task kind {name!r}; known kinds: {', '.join(sorted(KINDS))}") from None


def resolve(reference: str) -> Any:
    """Import ``"module:attribute"`` (a kind's flow or loader), for the layer that calls it."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def spec_from_dict(data: dict[str, Any]) -> DomainSpec:
    """Validate a domain's fields into the spec class of its ``task_kind`` (default text classification)."""
    kind = kind_of(str(data.get("task_kind", "text_classification")))
    return kind.spec_type.model_validate(data)
