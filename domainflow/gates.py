"""Quality gates as pure functions over numbers: which candidate, if any, replaces the champion.

Why pure: a promotion is the one irreversible-looking step of the pipeline, so its logic must be
testable with hand-written numbers, replayable from a stored decision, and free of I/O and
Prefect. :mod:`tasks.deploy` does the I/O (registry, artifacts) around :func:`decide`.

The rules, in order (thresholds come from ``spec.gates``, a :class:`~domains.base.QualityGates`):

1. **Floors.** Every candidate must meet every floor in ``gates.min_metrics`` on its *test* metrics, and, when
   the domain sets ``gates.max_epsilon``, carry a differential-privacy guarantee (``training`` of its evaluation:
   see ``domainflow.private_training``) whose spent epsilon is at most that. A candidate without one is not even
   ranked for the reference (rule 2): whether a model is private is known before any test metric, so filtering
   on it does not fit the choice to the test set.
2. **Reference.** Uncompressed candidates are ranked by their *validation* primary metric (ties:
   test primary, then name). The best is the reference. Selection uses validation, not test, so
   that the test set stays a gate and is not overfitted by picking whichever candidate got lucky
   on it; a reference that misses a floor is therefore not silently swapped for a runner-up.
3. **Compressed children.** A compressed candidate is eligible only if it meets the floors, loses at
   most ``gates.max_compression_drop`` of its parent's test primary metric, and is at least
   ``gates.min_compression_speedup`` times as fast (texts/s at batch 32). Only children of the
   reference compete. A cascade (fast student → the reference as served) is such a child; one whose
   threshold could not be calibrated within its margin on validation is rejected, quoting its numbers, and so is
   one that passes nothing on (its fast model alone, which competes as itself).
4. **Challenger.** The fastest eligible child of the reference, else the reference itself if it
   meets the floors, else nothing.
5. **Champion.** Promote only if the challenger's test primary beats the champion's (same test
   set) by more than ``gates.tie_tolerance``; a tie keeps the champion (no churn, no slow drift
   down). No champion: promote the first model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from domainflow.records import Evaluation
from domainflow.spec import DomainSpec
from domainflow.training_keys import PRIVACY_KEY

# Float slack for threshold comparisons: 130/100 must count as "1.30x faster".
_EPS = 1e-9


@dataclass
class CandidateVerdict:
    """Whether one candidate passed the gates, and why, with the numbers that decided it."""

    name: str
    eligible: bool
    reasons: list[str] = field(default_factory=list)
    role: str = "candidate"  # "reference", "compressed", "runner-up", "challenger"
    numbers: dict[str, Any] = field(default_factory=dict)  # the figures the reasons quote


@dataclass
class GateDecision:
    """The outcome of the gates for one run: JSON-able, stored in the registry whether or not it promotes."""

    domain: str
    chosen: str | None
    promote: bool
    summary: str
    verdicts: list[CandidateVerdict]
    challenger_metrics: dict[str, float]
    champion_metrics: dict[str, float] | None
    primary_metric: str
    decided_at: str
    champion_version: int | None = None
    gates: dict[str, Any] = field(default_factory=dict)  # the thresholds applied: gates are data

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def verdict(self, name: str) -> CandidateVerdict:
        for verdict in self.verdicts:
            if verdict.name == name:
                return verdict
        raise KeyError(f"no verdict for candidate {name!r}; candidates: {[v.name for v in self.verdicts]}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _metric(metrics: dict[str, float], name: str) -> float | None:
    value = metrics.get(name)
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _speed(evaluation: Evaluation) -> float:
    """Texts per second at batch 32; 0 when not measured (a compressed child then cannot prove its speed-up)."""
    return evaluation.texts_per_second_batch32 or 0.0


def _floor_reasons(evaluation: Evaluation, floors: dict[str, float]) -> tuple[bool, list[str]]:
    ok, reasons = True, []
    for metric, floor in sorted(floors.items()):
        value = _metric(evaluation.test_metrics, metric)
        if value is None:
            ok = False
            reasons.append(f"{metric} missing from test metrics (floor {floor:.3f})")
        elif value + _EPS < floor:
            ok = False
            reasons.append(f"{metric} {value:.3f} < floor {floor:.3f}")
        else:
            reasons.append(f"{metric} {value:.3f} >= floor {floor:.3f}")
    return ok, reasons


def privacy_reason(evaluation: Evaluation, max_epsilon: float | None) -> tuple[bool, str | None]:
    """Whether a candidate meets ``max_epsilon`` (always, when it is None), and the reason quoting its numbers."""
    if max_epsilon is None:
        return True, None
    guarantee = evaluation.training.get(PRIVACY_KEY)
    if not isinstance(guarantee, dict) or guarantee.get("epsilon") is None:
        return False, (
            f"no differential-privacy guarantee (trained without DP-SGD); max_epsilon {max_epsilon:g} required"
        )
    epsilon, delta = float(guarantee["epsilon"]), guarantee.get("delta")
    spent = f"epsilon {epsilon:.3f} (delta {delta:.2g})" if delta is not None else f"epsilon {epsilon:.3f}"
    if epsilon <= max_epsilon + _EPS:
        return True, f"{spent} <= max_epsilon {max_epsilon:g}"
    return False, f"{spent} > max_epsilon {max_epsilon:g}"


def _numbers(evaluation: Evaluation, primary: str) -> dict[str, Any]:
    ref = evaluation.candidate
    return {
        f"test_{primary}": _metric(evaluation.test_metrics, primary),
        f"validation_{primary}": _metric(evaluation.validation_metrics, primary),
        "texts_per_second_batch32": evaluation.texts_per_second_batch32,
        "size_bytes": evaluation.size_bytes,
        "compression": ref.compression,
        "parent": ref.parent,
        **_privacy_numbers(evaluation),
    }


def _privacy_numbers(evaluation: Evaluation) -> dict[str, Any]:
    guarantee = evaluation.training.get(PRIVACY_KEY)
    if not isinstance(guarantee, dict):
        return {}
    return {"epsilon": guarantee.get("epsilon"), "delta": guarantee.get("delta")}


def _rank_key(evaluation: Evaluation, primary: str) -> tuple:
    """Sort key for uncompressed candidates: best validation primary, then test primary, then name."""
    val = _metric(evaluation.validation_metrics, primary)
    test = _metric(evaluation.test_metrics, primary)
    return (
        -(val if val is not None else -math.inf),
        -(test if test is not None else -math.inf),
        evaluation.candidate.name,
    )


def reference_pool(evaluations: Iterable[Evaluation], primary: str, max_epsilon: float | None) -> list[Evaluation]:
    """The candidates that may be the reference, best first (rule 2): uncompressed, meeting ``max_epsilon`` when the
    domain sets it, ranked on validation. The one place that says so: the gate and the pipeline (which compresses
    the first of them) must agree on the reference, or every compressed child is judged against another parent."""
    eligible = [e for e in evaluations if e.candidate.compression is None and privacy_reason(e, max_epsilon)[0]]
    return sorted(eligible, key=lambda e: _rank_key(e, primary))


def select_reference(evaluations: Iterable[Evaluation], primary: str, max_epsilon: float | None = None) -> Evaluation:
    """The uncompressed candidate the gate treats as the reference (the pipeline compresses this one)."""
    evaluations = list(evaluations)
    if not any(e.candidate.compression is None for e in evaluations):
        raise ValueError("no uncompressed candidate to choose a reference from")
    pool = reference_pool(evaluations, primary, max_epsilon)
    if not pool:
        raise ValueError(
            f"no uncompressed candidate has a differential-privacy guarantee within max_epsilon {max_epsilon:g}: "
            "train one ([privacy] methods) or lift gates.max_epsilon"
        )
    return pool[0]


def _check_unique(evaluations: Iterable[Evaluation]) -> None:
    seen: set[str] = set()
    for evaluation in evaluations:
        name = evaluation.candidate.name
        if name in seen:
            raise ValueError(f"two evaluations share the candidate name {name!r}; names must be unique")
        seen.add(name)


def decide(
    spec: DomainSpec,
    evaluations: list[Evaluation],
    champion_metrics: dict[str, float] | None,
    *,
    champion_version: int | None = None,
) -> GateDecision:
    """Apply the domain's gates to the evaluated candidates and the champion's numbers.

    ``champion_metrics`` must be the champion's metrics *on the same test set* as the candidates
    (the caller re-evaluates it when the test set changed); ``None`` means there is no champion.
    Raises ``ValueError`` for inputs that cannot be judged (duplicate names, a champion without
    the primary metric), because guessing would make a promotion decision on missing numbers.
    """
    gates = spec.gates
    primary = spec.primary_metric
    floors = dict(gates.min_metrics)
    _check_unique(evaluations)
    if champion_metrics is not None and _metric(champion_metrics, primary) is None:
        raise ValueError(f"champion metrics lack the primary metric {primary!r}: {sorted(champion_metrics)}")

    by_name = {e.candidate.name: e for e in evaluations}
    verdicts: dict[str, CandidateVerdict] = {}
    floors_ok: dict[str, bool] = {}
    for evaluation in evaluations:
        name = evaluation.candidate.name
        ok, reasons = _floor_reasons(evaluation, floors)
        private, why = privacy_reason(evaluation, gates.max_epsilon)
        if why is not None:
            reasons.append(why)
        if not private and evaluation.candidate.compression is None:
            reasons.append("not ranked for the reference: fails max_epsilon")
        ok = ok and private
        floors_ok[name] = ok
        verdicts[name] = CandidateVerdict(
            name=name, eligible=ok, reasons=reasons, numbers=_numbers(evaluation, primary)
        )

    # Rule 2: the reference among uncompressed candidates, chosen on validation.
    uncompressed = reference_pool(evaluations, primary, gates.max_epsilon)
    reference = uncompressed[0] if uncompressed else None
    if reference is not None:
        ref_name = reference.candidate.name
        ref_val = _metric(reference.validation_metrics, primary)
        ref_test = _metric(reference.test_metrics, primary)
        verdicts[ref_name].role = "reference"
        verdicts[ref_name].reasons.append(
            f"reference: best validation {primary} {_fmt(ref_val)} among uncompressed candidates"
        )
        for other in uncompressed[1:]:
            name = other.candidate.name
            val = _metric(other.validation_metrics, primary)
            test = _metric(other.test_metrics, primary)
            verdict = verdicts[name]
            verdict.role = "runner-up"
            verdict.eligible = False
            if val is None:
                verdict.reasons.append(f"no validation {primary}; cannot rank against {ref_name} ({_fmt(ref_val)})")
            elif ref_val is not None and val < ref_val:
                verdict.reasons.append(f"lower validation {primary} than {ref_name} ({val:.4f} < {ref_val:.4f})")
            elif test is not None and ref_test is not None and test < ref_test:
                verdict.reasons.append(
                    f"ties {ref_name} on validation {primary} ({val:.4f}) but has lower test {primary} ({test:.4f} < "
                    f"{ref_test:.4f})"
                )
            else:
                verdict.reasons.append(
                    f"ties {ref_name} on validation and test {primary} ({val:.4f}); tie broken by name"
                )

    # Rule 3: compressed children against their parents.
    eligible_children: list[Evaluation] = []
    for evaluation in evaluations:
        ref = evaluation.candidate
        if ref.compression is None:
            continue
        verdict = verdicts[ref.name]
        verdict.role = "compressed"
        parent = by_name.get(ref.parent) if ref.parent else None
        if parent is None or parent.candidate.compression is not None:
            verdict.eligible = False
            verdict.reasons.append(
                f"parent {ref.parent!r} is not an uncompressed candidate in this run; cannot judge the compression"
            )
            continue
        ok = floors_ok[ref.name]
        parent_test = _metric(parent.test_metrics, primary)
        child_test = _metric(evaluation.test_metrics, primary)
        if parent_test is None or child_test is None:
            ok = False
            verdict.reasons.append(f"test {primary} missing for {ref.name} or its parent {parent.candidate.name}")
        else:
            drop = parent_test - child_test
            verdict.numbers[f"{primary}_drop"] = drop
            if drop <= gates.max_compression_drop + _EPS:
                verdict.reasons.append(
                    f"{primary} drop {drop:.4f} <= budget {gates.max_compression_drop:.4f} vs parent "
                    f"{parent.candidate.name}"
                    f" ({child_test:.4f} vs {parent_test:.4f})"
                )
            else:
                ok = False
                verdict.reasons.append(
                    f"{primary} drop {drop:.4f} > budget {gates.max_compression_drop:.4f} vs parent "
                    f"{parent.candidate.name}"
                    f" ({child_test:.4f} vs {parent_test:.4f})"
                )
        parent_speed = _speed(parent)
        child_speed = _speed(evaluation)
        if parent_speed <= 0:
            ok = False
            verdict.reasons.append(
                f"parent {parent.candidate.name} has no measured speed ({parent_speed:.1f} texts/s); cannot judge the "
                "speed-up"
            )
        else:
            speedup = child_speed / parent_speed
            verdict.numbers["speedup"] = speedup
            detail = f"{child_speed:.1f} vs {parent_speed:.1f} texts/s at batch 32"
            if speedup + _EPS >= gates.min_compression_speedup:
                verdict.reasons.append(
                    f"{ref.compression} is {speedup:.2f}x faster than its parent {parent.candidate.name} "
                    f"(>= {gates.min_compression_speedup:.2f}x; {detail})"
                )
            else:
                ok = False
                verdict.reasons.append(
                    f"{ref.compression} is only {speedup:.2f}x faster than its parent {parent.candidate.name} "
                    f"(< {gates.min_compression_speedup:.2f}x required; {detail})"
                )
        calibration = evaluation.fusion.get("calibration")
        if isinstance(calibration, dict) and not calibration.get("met", True):
            ok = False
            verdict.reasons.append(
                f"cascade calibration failed on validation: at threshold {calibration['threshold']:.4f} accuracy "
                f"{calibration['validation_accuracy']:.4f} is not within {calibration['margin']:.4f} of the strong "
                f"model's {calibration['strong_validation_accuracy']:.4f} while passing on at most the allowed share "
                f"({100 * calibration['validation_passed_on']:.1f}% passed on)"
            )
        if isinstance(calibration, dict) and calibration.get("met", True) and calibration["validation_passed_on"] == 0:
            # Its fast model alone already meets the margin: the cascade answers as that model does while loading
            # and shipping the strong one too, and a speed tie between the two would be settled by timing noise.
            ok = False
            fast = evaluation.fusion.get("fast", "its fast model")
            verdict.reasons.append(
                f"cascade passes nothing on at its calibrated threshold {calibration['threshold']:.4f}: it is {fast} "
                "alone (which competes as itself) plus a strong model it never calls"
            )
        if reference is None or parent.candidate.name != reference.candidate.name:
            ok = False
            verdict.reasons.append(
                f"its parent {parent.candidate.name} is not the reference"
                + (f" ({reference.candidate.name})" if reference is not None else "")
                + "; only children of the reference compete"
            )
        verdict.eligible = ok
        if ok:
            eligible_children.append(evaluation)

    # Rule 4: the challenger.
    challenger: Evaluation | None = None
    if eligible_children:
        eligible_children.sort(key=lambda e: (-_speed(e), e.candidate.name))
        challenger = eligible_children[0]
        for loser in eligible_children[1:]:
            verdicts[loser.candidate.name].reasons.append(
                f"passes the gates but is slower than {challenger.candidate.name}"
                f" ({loser.texts_per_second_batch32:.1f} < {challenger.texts_per_second_batch32:.1f} texts/s)"
            )
        assert reference is not None
        verdicts[reference.candidate.name].reasons.append(
            f"its compressed child {challenger.candidate.name} is chosen instead "
            f"({challenger.texts_per_second_batch32:.1f} vs {reference.texts_per_second_batch32:.1f} texts/s, within "
            f"the {primary} budget)"
        )
    elif reference is not None and floors_ok[reference.candidate.name]:
        if _metric(reference.test_metrics, primary) is None:
            verdicts[reference.candidate.name].eligible = False
            verdicts[reference.candidate.name].reasons.append(
                f"test {primary} missing: cannot be compared with the champion"
            )
        else:
            challenger = reference
        if any(
            e.candidate.compression is not None and e.candidate.parent == reference.candidate.name for e in evaluations
        ):
            verdicts[reference.candidate.name].reasons.append(
                "no compressed child passes the gates; the reference itself is the challenger"
            )

    gate_table = {
        "min_metrics": floors,
        "tie_tolerance": gates.tie_tolerance,
        "max_compression_drop": gates.max_compression_drop,
        "min_compression_speedup": gates.min_compression_speedup,
        "max_epsilon": gates.max_epsilon,
    }
    decided_at = datetime.now(UTC).isoformat(timespec="seconds")

    def finish(chosen: Evaluation | None, promote: bool, summary: str) -> GateDecision:
        return GateDecision(
            domain=spec.name,
            chosen=chosen.candidate.name if chosen else None,
            promote=promote,
            summary=summary,
            verdicts=[verdicts[e.candidate.name] for e in evaluations],
            challenger_metrics=dict(chosen.test_metrics) if chosen else {},
            champion_metrics=dict(champion_metrics) if champion_metrics is not None else None,
            primary_metric=primary,
            decided_at=decided_at,
            champion_version=champion_version,
            gates=gate_table,
        )

    champion_label = f"champion v{champion_version}" if champion_version is not None else "the champion"
    if challenger is None:
        if not evaluations:
            why = "no candidates were evaluated"
        elif reference is None and gates.max_epsilon is not None:
            why = (
                "no uncompressed candidate has a differential-privacy guarantee within max_epsilon "
                f"{gates.max_epsilon:g}"
            )
        elif reference is None:
            why = "no uncompressed candidate to serve as reference"
        else:
            failed = [r for r in verdicts[reference.candidate.name].reasons if "< floor" in r or "missing" in r]
            failed = failed or [f"test {primary} missing"]
            why = (
                f"reference {reference.candidate.name} fails the gates ({'; '.join(failed)}) "
                "and no compressed child passes"
            )
        keep = f"; {champion_label} stays" if champion_metrics is not None else ""
        return finish(None, False, f"Nothing promoted for {spec.name}: {why}{keep}.")

    name = challenger.candidate.name
    verdict = verdicts[name]
    verdict.role = "challenger"
    challenger_value = _metric(challenger.test_metrics, primary)
    assert challenger_value is not None  # checked above for the reference, by the drop rule for a child
    if champion_metrics is None:
        verdict.reasons.append(f"no champion yet: first model (test {primary} {challenger_value:.4f})")
        return finish(
            challenger,
            True,
            f"Promote {name} as the first model for {spec.name} (test {primary} {challenger_value:.4f}, all floors "
            "met).",
        )

    champion_value = _metric(champion_metrics, primary)
    assert champion_value is not None
    margin = challenger_value - champion_value
    tol = gates.tie_tolerance
    numbers = f"{primary} {challenger_value:.4f} vs {champion_label} {champion_value:.4f}, margin {margin:+.4f}"
    if margin > tol + _EPS:
        verdict.reasons.append(f"beats {champion_label}: {numbers} > tolerance {tol:.4f}")
        return finish(
            challenger,
            True,
            f"Promote {name}: it beats {champion_label} on the same test set ({numbers} > tolerance {tol:.4f}).",
        )
    if abs(margin) <= tol + _EPS:
        verdict.reasons.append(f"ties {champion_label}: {numbers} within tolerance {tol:.4f}; a tie keeps the champion")
        return finish(
            challenger,
            False,
            f"Keep {champion_label}: challenger {name} ties it within tolerance ({numbers}, tolerance {tol:.4f}).",
        )
    verdict.reasons.append(f"worse than {champion_label}: {numbers}")
    return finish(
        challenger, False, f"Keep {champion_label}: challenger {name} is worse on the same test set ({numbers})."
    )
