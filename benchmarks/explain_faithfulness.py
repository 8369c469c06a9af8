"""Are the explanations faithful, and what does one cost? Deletion tests on a finished run's models.

Usage (from the repository root, with the home of a finished run)::

    DOMAINFLOW_HOME=/path/to/home python benchmarks/explain_faithfulness.py [--domain customer_service] [--texts 300]

Models: the domain's champion from the registry (for customer_service the int8 ONNX graph, which only
occlusion can explain) and its fp32 twin from the run's models folder (the same candidate before int8
export: what integrated gradients needs; ``--fp32-dir`` to name another).

Faithfulness (comprehensiveness, DeYoung et al. 2020, "ERASER"): on a seeded sample of the domain's test
texts, delete each text's k highest-scored words (k = 1..5; all of them when it has fewer) and measure the
drop of the predicted class's probability; the same with k words drawn at random (``--random-draws``
draws, averaged). AOPC is the mean drop over k = 1..5. Per method and model: the drops at each k, AOPC,
the random baseline's AOPC on the same model, and the verdict of the rule that decides whether a method is
offered at all (``domainflow.explain.beats_random``: AOPC above random by more than two standard errors of
the paired per-text difference). A method in ``domainflow.explain.OFFERED_METHODS`` that fails it makes
this script exit 1: take it out of the list.

Rows: occlusion on the champion (what the service answers with); occlusion scored by probability drops
instead of log-odds drops (the same deletions ranked by the saturating measure: why the service uses
log-odds); occlusion and integrated gradients on the fp32 twin; and integrated gradients of the fp32 twin
applied to the champion (does explaining the fp32 model explain the deployed int8 one?).

Cost: p50 wall time of one explanation (``explain_text``, occlusion) against one batch-1 prediction
(``predict_proba`` of one text) on the champion, interleaved text by text so both see the same machine
load; the issue's budget is 20 predictions per explanation.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark the checkout this script belongs to, not another installed copy

from benchmarks.common import argument_parser, labelled_test_texts  # noqa: E402
from domainflow.settings import configure_environment  # noqa: E402

configure_environment()

KS = (1, 2, 3, 4, 5)
EXPLAIN_BUDGET_PREDICTIONS = 20  # the issue: an explanation costs at most ~20 batch-1 predictions


def fp32_twin(champion_dir: Path, runs_models: Path) -> Path:
    """The run's fp32 folder of the champion's candidate (its name without the int8 suffix), else the champion's
    own folder when it is fp32 already."""
    from domainflow.modeling import read_metadata

    metadata = read_metadata(champion_dir)
    if not metadata.get("compression"):
        return champion_dir
    wanted = str(metadata.get("candidate", "")).removesuffix("-onnx-int8").removesuffix("-int8")
    for folder in sorted(runs_models.iterdir()) if runs_models.is_dir() else []:
        meta = folder / "domainflow.json"
        if meta.is_file() and json.loads(meta.read_text()).get("candidate") == wanted:
            if not json.loads(meta.read_text()).get("compression"):
                return folder
    raise SystemExit(f"no fp32 folder of candidate {wanted!r} under {runs_models}: give --fp32-dir")


def curve_row(method: str, attributed: str, evaluated: str, drops: Any, random_drops: Any, seconds: float) -> dict:
    """One table row: mean drop per k, AOPC, the random baseline's AOPC and the offering rule's verdict."""
    from domainflow.explain import beats_random

    aopc, random_aopc = drops.mean(axis=1), random_drops.mean(axis=1)
    return {
        "method": method,
        "attributed_on": attributed,
        "evaluated_on": evaluated,
        **{f"drop@{k}": round(float(drops[:, i].mean()), 4) for i, k in enumerate(KS)},
        "aopc": round(float(aopc.mean()), 4),
        **{f"random@{k}": round(float(random_drops[:, i].mean()), 4) for i, k in enumerate(KS)},
        "random_aopc": round(float(random_aopc.mean()), 4),
        "beats_random": beats_random(aopc, random_aopc),
        "ms_per_text": round(1000 * seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--domain", default="customer_service", help="a classifier domain with a champion")
    parser.add_argument("--texts", type=int, default=300, help="test texts to explain (a seeded sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-draws", type=int, default=3, help="random deletions per text and k, averaged")
    parser.add_argument("--fp32-dir", type=Path, help="the fp32 model for integrated gradients (default: the twin)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from domainflow import settings
    from domainflow.explain import (
        OFFERED_METHODS,
        deletion_drops,
        explain_text,
        integrated_gradients,
        occlude,
        random_ranking,
        top_ranking,
    )
    from domainflow.modeling import load_classifier, predict_proba
    from domainflow.registry import ModelRegistry

    champion = ModelRegistry(args.domain).champion()
    if champion is None:
        raise SystemExit(f"{args.domain} has no champion under {settings.registry_dir()}: finish a run first")
    fp32_dir = args.fp32_dir or fp32_twin(champion.model_dir, settings.runs_dir() / args.domain / "models")
    models = {"champion": load_classifier(champion.model_dir), "fp32": load_classifier(fp32_dir)}
    texts, _ = labelled_test_texts(args.domain, args.texts, args.seed)
    print(
        f"{args.domain} v{champion.version} ({champion.lineage.get('candidate')}, "
        f"{models['champion'].metadata.get('compression') or 'fp32'}); fp32 twin {fp32_dir.name}; "
        f"{len(texts)} test texts; torch threads {torch.get_num_threads()}",
        flush=True,
    )

    rows: list[dict] = []
    rng = random.Random(args.seed)
    rankings: dict[str, list[list[int]]] = {}
    for name, loaded in models.items():
        started = time.perf_counter()
        occluded = occlude(loaded, texts, batch_size=64)
        seconds = (time.perf_counter() - started) / len(texts)
        targets = [int(item.probabilities.argmax()) for item in occluded]
        visible = [item.visible for item in occluded]
        draws = [[random_ranking(v, rng) for v in visible] for _ in range(args.random_draws)]
        random_drops = np.mean([deletion_drops(loaded, texts, draw, targets, KS) for draw in draws], axis=0)
        rankings[f"occlusion/{name}"] = [
            top_ranking(o.drops(t), o.visible) for o, t in zip(occluded, targets, strict=True)
        ]
        drops = deletion_drops(loaded, texts, rankings[f"occlusion/{name}"], targets, KS)
        rows.append(curve_row("occlusion", name, name, drops, random_drops, seconds))
        if name == "champion":  # the same deletions ranked by probability drops (ties broken by word order)
            probabilities = [torch.softmax(o.logits.float(), dim=-1) for o in occluded]
            by_probability = [
                top_ranking((p[0, t] - p[1:, t]).tolist(), o.visible)
                for p, o, t in zip(probabilities, occluded, targets, strict=True)
            ]
            drops = deletion_drops(loaded, texts, by_probability, targets, KS)
            rows.append(curve_row("occlusion (probability drops)", name, name, drops, random_drops, seconds))
            champion_targets, champion_random = targets, random_drops
        else:
            started = time.perf_counter()
            explained = [integrated_gradients(loaded, text) for text in texts]
            seconds = (time.perf_counter() - started) / len(texts)
            rankings["integrated_gradients/fp32"] = [
                top_ranking(e.scores, v) for e, v in zip(explained, visible, strict=True)
            ]
            drops = deletion_drops(loaded, texts, rankings["integrated_gradients/fp32"], targets, KS)
            rows.append(curve_row("integrated_gradients", name, name, drops, random_drops, seconds))
            drops = deletion_drops(
                models["champion"], texts, rankings["integrated_gradients/fp32"], champion_targets, KS
            )
            rows.append(curve_row("integrated_gradients", name, "champion", drops, champion_random, seconds))
        print(f"{name}: done ({time.perf_counter() - started:.0f} s for the last method)", flush=True)

    columns = ["method", "attributed_on", "evaluated_on", *(f"drop@{k}" for k in KS), "aopc", "random_aopc"]
    columns += ["beats_random", "ms_per_text"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    print("random baseline per k (champion): " + ", ".join(f"k={k} {rows[0][f'random@{k}']}" for k in KS))

    # Cost on the champion: one explanation against one batch-1 prediction, interleaved.
    champion_model = models["champion"]
    for text in texts[:10]:  # warm-up
        predict_proba(champion_model, [text], batch_size=1)
        explain_text(champion_model, text)
    predict_ms, explain_ms = [], []
    for text in texts:
        started = time.perf_counter()
        predict_proba(champion_model, [text], batch_size=1)
        predict_ms.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        explain_text(champion_model, text)
        explain_ms.append(1000 * (time.perf_counter() - started))
    cost = {
        "predict_p50_ms": round(statistics.median(predict_ms), 2),
        "explain_p50_ms": round(statistics.median(explain_ms), 2),
        "words_p50": statistics.median(len(o.words) for o in occlude(champion_model, texts[:50], batch_size=64)),
    }
    cost["ratio"] = round(cost["explain_p50_ms"] / cost["predict_p50_ms"], 1)
    print(
        f"\ncost on the champion: explain p50 {cost['explain_p50_ms']} ms vs predict (batch 1) p50 "
        f"{cost['predict_p50_ms']} ms: {cost['ratio']}x (budget {EXPLAIN_BUDGET_PREDICTIONS}x) "
        f"{'within' if cost['ratio'] <= EXPLAIN_BUDGET_PREDICTIONS else 'OVER'} budget"
    )

    # The rule: an offered method must beat random on every model it explains itself.
    failing = []
    for method in OFFERED_METHODS:
        for row in (r for r in rows if r["method"] == method and r["attributed_on"] == r["evaluated_on"]):
            verdict = "beats random" if row["beats_random"] else "does NOT beat random: must not be offered"
            print(f"{method} on {row['evaluated_on']}: AOPC {row['aopc']} vs random {row['random_aopc']} ({verdict})")
            if not row["beats_random"] and method not in failing:
                failing.append(method)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cost": cost, "texts": len(texts)}, indent=2))
    if failing:
        print(f"take {', '.join(failing)} out of domainflow.explain.OFFERED_METHODS", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
