"""The ranking gate: the general gate of :mod:`domainflow.gates`, plus "beat every baseline".

Why a baseline rule: a recommender that does not beat recommending the most popular items, plain
matrix factorisation, or co-occurrence with the user's last films (a training-free item-kNN)
adds cost without value, however it compares with the champion. The baselines are evaluated on
the same test users, items and protocol as the candidates, so their test NDCG@10 is a floor
measured, not assumed.

Why a confidence interval: with ~900 evaluated users, NDCG@10 gaps of half a point are within
noise. Each comparison is the mean per-user difference of the primary metric between the
challenger and the baseline, with a 95% paired bootstrap interval over users
(:mod:`domainflow.recsys.bootstrap`, from the per-user test ranks both models were scored with).

Rules, on top of :func:`domainflow.gates.decide` (floors, choice of the reference on
validation, compressed children within budget and faster, the champion on the same test set):

* against each baseline the comparison is a **win** (interval above 0), a **tie** (interval
  includes 0 — reported as a tie even when the point estimate is positive) or a **loss**;
* the challenger is promoted only if it *wins* against every baseline: a tie means it was not
  shown to beat that baseline, so nothing is promoted and the champion (if any) stays;
* each baseline appears in the decision as a verdict with role ``baseline`` (never eligible:
  baselines are the floor, not deployable models) with its number and the comparison.

Pure, like :func:`decide`: numbers (metrics and per-user ranks) in, decision out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from domainflow.gates import CandidateVerdict, GateDecision, decide
from domainflow.records import Evaluation
from domainflow.recsys.bootstrap import Interval, paired_difference, per_user
from domainflow.spec import DomainSpec

RULE = (
    "the challenger must beat every baseline on test {primary}: the 95% paired bootstrap interval over users of "
    "the difference must lie above 0; an interval that includes 0 is a tie, and a tie blocks promotion"
)


def _ranks_of(name: str, ranks: Mapping[str, Sequence[int]], value: float, primary: str) -> np.ndarray:
    """The stored test ranks of ``name``, checked against its reported metric (so a mix-up of files
    cannot decide a promotion)."""
    if name not in ranks:
        raise ValueError(f"the ranking gate needs the per-user test ranks of {name!r}; got ranks of {sorted(ranks)}")
    array = np.asarray(ranks[name])
    recomputed = float(per_user(array, primary).mean())
    if abs(recomputed - value) > 1e-9:
        raise ValueError(
            f"the test ranks of {name!r} give {primary} {recomputed:.6f}, but its evaluation reports {value:.6f}"
        )
    return array


def _comparison(name: str, value: float, floor: float, interval: Interval, primary: str) -> str:
    numbers = f"{primary} {value:.4f} vs {floor:.4f}, difference {interval.text()} (95% CI over users)"
    if interval.verdict == "win":
        return f"beats baseline {name}: {numbers}"
    if interval.verdict == "tie":
        return f"ties baseline {name}: {numbers} includes 0, so it is not shown to beat it"
    return f"loses to baseline {name}: {numbers}"


def decide_ranking(
    spec: DomainSpec,
    evaluations: list[Evaluation],
    champion_metrics: dict[str, float] | None,
    *,
    champion_version: int | None = None,
    baselines: list[Evaluation],
    test_ranks: Mapping[str, Sequence[int]],
) -> GateDecision:
    """:func:`decide` on the deployable candidates, then the baseline rule (see the module docstring).

    ``test_ranks``: per model name (candidates and baselines), the held-out test item's rank per
    evaluated user, in the same user order for every model.
    """
    if not baselines:
        raise ValueError("the ranking gate needs at least one evaluated baseline")
    decision = decide(spec, evaluations, champion_metrics, champion_version=champion_version)
    primary = spec.primary_metric
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
                reasons=[f"baseline (not deployable): test {primary} {value:.4f}"],
                numbers={
                    f"test_{primary}": float(value),
                    f"validation_{primary}": baseline.validation_metrics.get(primary),
                },
            )
        )
    decision.gates["baselines"] = floors
    decision.gates["baseline_rule"] = RULE.format(primary=primary)
    if decision.chosen is None:
        return decision

    verdict = decision.verdict(decision.chosen)
    value = float(decision.challenger_metrics[primary])
    challenger = _ranks_of(decision.chosen, test_ranks, value, primary)
    comparisons: dict[str, dict] = {}
    blocked = []
    for name, floor in floors.items():
        interval = paired_difference(challenger, _ranks_of(name, test_ranks, floor, primary), primary)
        comparisons[name] = {**interval.to_dict(), "verdict": interval.verdict}
        reason = _comparison(name, value, floor, interval, primary)
        verdict.reasons.append(reason)
        decision.verdict(name).reasons.append(f"{decision.chosen} vs {name}: {interval.verdict}")
        decision.verdict(name).numbers[f"difference_{primary}"] = interval.to_dict()
        if interval.verdict != "win":
            verb = "ties" if interval.verdict == "tie" else "loses to"
            blocked.append(
                f"{verb} baseline {name} ({primary} {value:.4f} vs {floor:.4f}, difference {interval.text()})"
            )
    decision.gates["baseline_comparisons"] = comparisons
    if blocked:
        decision.promote = False
        keep = f" Champion v{champion_version} stays." if champion_version is not None else ""
        decision.summary = (
            f"Nothing promoted for {spec.name}: challenger {decision.chosen} is not shown to beat every baseline: "
            f"it {'; '.join(blocked)}.{keep}"
        )
    else:
        decision.summary += (
            f" It beats every baseline outside the 95% CI ({', '.join(f'{n} {v:.4f}' for n, v in floors.items())})."
        )
    return decision
