"""The ranking gate: the general gate of :mod:`domainflow.gates`, plus "beat every baseline".

Why a baseline rule: a recommender that does not beat recommending the most popular items (or
plain matrix factorisation) on the declared protocol adds cost without value, however it
compares with the champion. The baselines are evaluated on the same test users, items and
protocol as the candidates, so their test NDCG@10 is a floor measured, not assumed.

Rules, on top of :func:`domainflow.gates.decide` (floors, choice of the reference on
validation, compressed children within budget and faster, the champion on the same test set):

* the challenger's test primary metric must exceed each baseline's by more than the domain's
  ``tie_tolerance``; otherwise nothing is promoted, whatever the champion comparison said;
* each baseline appears in the decision as a verdict with role ``baseline`` (never eligible:
  baselines are the floor, not deployable models) and its number.

Pure, like :func:`decide`: numbers in, decision out.
"""

from __future__ import annotations

from domainflow.gates import CandidateVerdict, GateDecision, decide
from domainflow.records import Evaluation
from domainflow.spec import DomainSpec


def decide_ranking(
    spec: DomainSpec,
    evaluations: list[Evaluation],
    champion_metrics: dict[str, float] | None,
    *,
    champion_version: int | None = None,
    baselines: list[Evaluation],
) -> GateDecision:
    """:func:`decide` on the deployable candidates, then the baseline rule (see the module docstring)."""
    if not baselines:
        raise ValueError("the ranking gate needs at least one evaluated baseline")
    decision = decide(spec, evaluations, champion_metrics, champion_version=champion_version)
    primary, tolerance = spec.primary_metric, spec.gates.tie_tolerance
    floors: dict[str, float] = {}
    for baseline in baselines:
        name = baseline.candidate.name
        value = baseline.test_metrics.get(primary)
        if value is None:
            raise ValueError(f"baseline {name!r} has no test {primary}")
        floors[name] = float(value)
        decision.verdicts.append(
            CandidateVerdict(
                name=name,
                eligible=False,
                role="baseline",
                reasons=[
                    f"baseline (not deployable): test {primary} {value:.4f}; the challenger must beat it by more than "
                    f"{tolerance:.4f}"
                ],
                numbers={
                    f"test_{primary}": float(value),
                    f"validation_{primary}": baseline.validation_metrics.get(primary),
                },
            )
        )
    decision.gates["baselines"] = floors
    if decision.chosen is None:
        return decision

    verdict = decision.verdict(decision.chosen)
    value = float(decision.challenger_metrics[primary])
    failed = []
    for name, floor in floors.items():
        margin = value - floor
        numbers = f"{primary} {value:.4f} vs {floor:.4f}, margin {margin:+.4f}"
        if margin > tolerance:
            verdict.reasons.append(f"beats baseline {name}: {numbers} > tolerance {tolerance:.4f}")
        else:
            verdict.reasons.append(f"does not beat baseline {name}: {numbers} <= tolerance {tolerance:.4f}")
            failed.append(f"{name} ({numbers})")
    if failed:
        decision.promote = False
        keep = f" Champion v{champion_version} stays." if champion_version is not None else ""
        decision.summary = (
            f"Nothing promoted for {spec.name}: challenger {decision.chosen} "
            f"does not beat baseline {'; '.join(failed)}.{keep}"
        )
    else:
        decision.summary += f" It beats every baseline ({', '.join(f'{n} {v:.4f}' for n, v in floors.items())})."
    return decision
