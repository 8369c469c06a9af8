"""``domainflow``: run a domain's pipeline, inspect and roll back the registry, try a model.

Runs on Prefect's ephemeral server unless ``PREFECT_API_URL`` points at a real one,
so a fresh clone needs no running services.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domainflow.settings import configure_environment

configure_environment()  # before Prefect / Hugging Face read their settings

import typer  # noqa: E402
from rich.table import Table  # noqa: E402

from domainflow.catalog import MODULES_ENV, add_domain_modules  # noqa: E402
from domainflow.domain_files import DomainFileError, looks_like_domain_file  # noqa: E402
from domainflow.spec import ClassificationSpec, DomainSpec  # noqa: E402
from flows.console import EXIT_BAD_DATA, EXIT_NOT_PROMOTED, EXIT_REGISTRY, domain_name, fail, make_console  # noqa: E402

if TYPE_CHECKING:
    from domainflow.registry import VersionInfo
    from flows.runners import DomainsReport

app = typer.Typer(
    help="domainflow: turn a pretrained transformer into a deployed model for a business domain, as Prefect flows.\n\n"
    "Every command takes the domain as its DOMAIN argument: a registered name (`domainflow domains`) or a domain file "
    "(path/to/domain.toml).\n\n"
    "Exit codes: 0 ok; 2 usage error, unknown domain or bad domain file; 3 the data failed validation; 4 nothing "
    "promoted (with --require-promotion).",
    no_args_is_help=True,
    add_completion=False,
)
registry_app = typer.Typer(help="Inspect the model registry and roll back a domain's champion.", no_args_is_help=True)
domains_app = typer.Typer(
    help="List the known domains; add your own domain file; show a domain's fields.", invoke_without_command=True
)
app.add_typer(registry_app, name="registry")
app.add_typer(domains_app, name="domains")
console = make_console()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"domainflow {version('domainflow')}")
        raise typer.Exit()


@app.callback()
def main_options(
    domain_module: list[str] | None = typer.Option(
        None,
        "--domain-module",
        help=(
            "Python module to import first that defines domains (repeatable; also read from "
            f"{MODULES_ENV}, comma-separated, which child processes inherit)."
        ),
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Options that hold for every command."""
    if domain_module:
        try:
            add_domain_modules(domain_module)
        except DomainFileError as exc:
            fail(str(exc))


@app.command()
def run(
    domains: list[str] | None = typer.Argument(
        None,
        help="Domain(s) to run: registered names or domain files (path/to/domain.toml). Several run at once.",
        metavar="DOMAIN",
        show_default=False,
    ),
    all_domains: bool = typer.Option(False, "--all", help="Run every registered domain (`domainflow domains`)."),
    model: str | None = typer.Option(
        None,
        help="Base encoder: 'minilm' (default, offline), a local folder, or a hub name (needs DOMAINFLOW_ONLINE=1).",
    ),
    data_dir: str | None = typer.Option(
        None, help="Folder with the domain's train/test files (default: the domain's own files; one domain only)."
    ),
    train_file: str | None = typer.Option(
        None, help="Explicit training file (CSV, JSON/JSONL or Parquet); needs --test-file; one domain only."
    ),
    test_file: str | None = typer.Option(None, help="Explicit test file; needs --train-file."),
    max_train_samples: int | None = typer.Option(
        None, min=1, help="Stratified subsample of the training data (quick runs)."
    ),
    max_test_samples: int | None = typer.Option(
        None, min=1, help="Stratified subsample of the test data (quick runs)."
    ),
    epochs: float | None = typer.Option(None, min=0.01, help="Fine-tuning epochs (default: the domain's)."),
    seed: int = typer.Option(42, help="Seed for sampling, splitting and training."),
    num_layers: int | None = typer.Option(None, min=1, help="Keep only the first N encoder layers (quick runs)."),
    refresh_cache: bool = typer.Option(
        False, "--refresh-cache", help="Recompute every step instead of reusing cached results."
    ),
    task_runner: str = typer.Option(
        "default",
        "--task-runner",
        help="Where tasks run: 'default' (Prefect's thread pool, one thread unless --workers), 'dask' or 'ray' "
        "(a local cluster, or the one at --dask-address / --ray-address). Every worker must see the same "
        "DOMAINFLOW_HOME at the same path.",
    ),
    dask_address: str | None = typer.Option(
        None, "--dask-address", help="Scheduler of an existing Dask cluster (tcp://HOST:8786); implies dask."
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="An existing Ray cluster (HOST:6379 or ray://HOST:10001); implies ray."
    ),
    workers: int | None = typer.Option(
        None,
        min=1,
        help="Threads of the default runner (default 1), or worker processes of a local Dask/Ray cluster "
        "(default: the CPU count).",
    ),
    wait: bool = typer.Option(
        True,
        "--wait/--no-wait",
        help="When another run of this domain holds its lock: wait for it (default) or exit at once.",
    ),
    require_promotion: bool = typer.Option(
        False,
        "--require-promotion",
        help=f"Exit with {EXIT_NOT_PROMOTED} when the run promotes nothing (for CI and schedulers).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the summary (candidates, decision) as JSON on stdout instead of tables."
    ),
    report_to: list[str] | None = typer.Option(
        None,
        "--report-to",
        help="Report training losses and metrics to tensorboard and/or mlflow (repeatable or a comma list; "
        "'none': off). Default: the domain's training.report_to. A step served from the cache trains, and "
        "reports, nothing: add --refresh-cache for the curves of a cached model.",
    ),
) -> None:
    """Run ingest → fine-tune → compress → evaluate → deploy for DOMAIN (or several domains at once).

    Prints the candidates and the gate's decision.

    Several domains (or --all) run at once, as subflows of one flow; the exit code is that of the first that failed."""
    from domainflow.kinds import kind_of, resolve
    from flows.prefect_server import tether_ephemeral_server
    from flows.runners import ClusterSetupError, run_domains, start_runner

    names = _domains_to_run(domains or [], all_domains)
    kind = _runner_kind(task_runner, dask_address, ray_address)
    if len(names) > 1 and (data_dir or train_file or test_file):
        fail("--data-dir, --train-file and --test-file name one domain's data: run that domain alone")
    options: dict[str, Any] = {
        "model": model,
        "data_dir": data_dir,
        "train_file": train_file,
        "test_file": test_file,
        "max_train_samples": max_train_samples,
        "max_test_samples": max_test_samples,
        "epochs": epochs,
        "seed": seed,
        "num_layers": num_layers,
        "refresh_cache": refresh_cache,
        "wait_for_lock": wait,
    }
    if report_to:
        options["report_to"] = _reporters_for(report_to, names)
    tether_ephemeral_server()  # a run killed with SIGKILL must not leave Prefect's server behind
    started = time.perf_counter()
    # With --json, stdout carries the summary alone: progress that libraries print goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    report: DomainsReport | None = None
    try:
        with quiet, start_runner(kind, address=dask_address or ray_address, workers=workers) as plan:
            if len(names) > 1:
                report = run_domains(names, plan, options)
            else:
                pipeline = resolve(kind_of(_domain_spec(names[0])).flow)
                if kind != "default" or workers is not None:
                    pipeline = pipeline.with_options(task_runner=plan.task_runner())
                summary = pipeline(domain=names[0], **options)
    except ClusterSetupError as exc:
        fail(str(exc))
    except Exception as exc:
        code = _exit_code(exc)
        if code is None:
            raise
        fail(_error_message(exc), code)
    seconds = time.perf_counter() - started
    if report is not None:
        _report_several(report, seconds, as_json, require_promotion)
        return
    if as_json:
        typer.echo(json.dumps({**summary, "seconds": round(seconds, 1)}, default=str))
    else:
        _print_summary(summary, seconds)
    if require_promotion and summary.get("version") is None:
        raise typer.Exit(code=EXIT_NOT_PROMOTED)


def _domains_to_run(domains: list[str], all_domains: bool) -> list[str]:
    """The domains a `run` names (files as absolute paths, so every worker reads the same one), in order, once."""
    from domainflow.catalog import catalog

    if all_domains and domains:
        fail("give DOMAIN arguments or --all, not both")
    if all_domains:
        try:
            return sorted(catalog())
        except DomainFileError as exc:
            fail(str(exc))
    if not domains:
        fail("name a DOMAIN to run (`domainflow domains` lists them), or --all")
    names: list[str] = []
    seen: set[str] = set()
    for domain in domains:
        spec = _domain_spec(domain)  # an unknown domain or a bad file stops the command before anything runs
        if spec.name not in seen:
            seen.add(spec.name)
            names.append(str(Path(domain).resolve()) if looks_like_domain_file(domain) else domain)
    return names


def _reporters_for(values: list[str], domains: list[str]) -> list[str]:
    """--report-to as a list of reporters, checked before anything runs: known names, installed libraries,
    and only for domains trained by the transformers Trainer (text classification)."""
    from domainflow.tracking import ReportingUnavailableError, parse_report_to, require_reporters

    try:
        reporters = parse_report_to(values)
        require_reporters(reporters)
    except ReportingUnavailableError as exc:
        fail(str(exc))
    for domain in domains:
        spec = _domain_spec(domain)
        if not isinstance(spec, ClassificationSpec):
            fail(
                f"--report-to applies to text classification domains: {spec.name} is a {spec.task_kind} domain, "
                "whose training does not run the transformers Trainer; run it without --report-to"
            )
    return list(reporters)


def _runner_kind(task_runner: str, dask_address: str | None, ray_address: str | None) -> str:
    """The runner asked for; an address implies its runner, and names only that one."""
    from flows.runners import TASK_RUNNERS

    if dask_address and ray_address:
        fail("give --dask-address or --ray-address, not both")
    implied = "dask" if dask_address else "ray" if ray_address else None
    if task_runner not in TASK_RUNNERS:
        fail(f"unknown task runner {task_runner!r}; known: {', '.join(TASK_RUNNERS)}")
    if implied and task_runner not in ("default", implied):
        fail(f"--{implied}-address needs --task-runner {implied}, not {task_runner}")
    return implied or task_runner


def _exit_code(exc: BaseException | set[str]) -> int | None:
    """The exit code of a run's error (an exception, or the names of its classes when it comes from one domain of
    several); None: not an error a run expects (a bug: its traceback is shown)."""
    from flows.console import EXIT_USAGE

    names = {klass.__name__ for klass in type(exc).__mro__} if isinstance(exc, BaseException) else exc
    if "DataValidationError" in names:
        return EXIT_BAD_DATA
    if "RegistryError" in names:  # refused (a concurrent promotion) or damaged: nothing of it was changed
        return EXIT_REGISTRY
    if names & {"DomainBusyError", "FileNotFoundError", "ValueError"}:  # SharedPathError is a FileNotFoundError
        return EXIT_USAGE
    return None


def _error_message(exc: BaseException) -> str:
    if _exit_code(exc) == EXIT_BAD_DATA:
        return f"data validation failed; nothing was trained and the registry is unchanged.\n{exc}"
    if _exit_code(exc) == EXIT_REGISTRY:
        return f"registry: {exc}"
    return str(exc)


def _report_several(report: DomainsReport, seconds: float, as_json: bool, require_promotion: bool) -> None:
    """Each domain's summary (one JSON object for all with --json), then which domains failed and the exit code:
    that of the first failed domain, or EXIT_NOT_PROMOTED under --require-promotion when one promoted nothing."""
    if as_json:
        typer.echo(json.dumps({**report.model_dump(), "seconds": round(seconds, 1)}, default=str))
    else:
        for summary in report.summaries.values():
            _print_summary(summary, seconds)
    codes = [_exit_code(set(kinds)) or 1 for kinds in report.error_types.values()]
    for domain, error in report.errors.items():
        make_console(stderr=True).print(f"[red]error:[/red] {domain} failed: {error}", highlight=False)
    if codes:
        failed, total = ", ".join(report.errors), len(report.errors) + len(report.summaries)
        make_console(stderr=True).print(
            f"{len(report.errors)} of {total} domain(s) failed: {failed}; finished: "
            f"{', '.join(report.summaries) or 'none'} (task runner: {report.task_runner})",
            highlight=False,
        )
        raise typer.Exit(code=codes[0])
    if require_promotion and any(summary.get("version") is None for summary in report.summaries.values()):
        raise typer.Exit(code=EXIT_NOT_PROMOTED)


def _print_summary(summary: dict, seconds: float) -> None:
    """The candidates, the gate's verdict on each with its reasons, and where the champion is."""
    rows = summary["candidates"]
    table = Table(title=f"{summary['domain']}: candidates (run took {seconds:.0f} s)")
    metric_columns = [c for c in (rows[0] if rows else {}) if c.startswith(("test_", "validation_"))]
    columns = summary.get("columns") or [
        "candidate",
        *metric_columns,
        "size_mb",
        "texts_per_second_batch1",
        "texts_per_second_batch32",
        "latency_ms_p50",
        "train_seconds",
    ]
    headers = {
        "size_mb": "MB",
        "texts_per_second_batch1": "texts/s b1",
        "texts_per_second_batch32": "texts/s b32",
        "latency_ms_p50": "p50 ms",
        "train_seconds": "train s",
        "histories_per_second_batch32": "histories/s b32",
    }
    for column in columns:
        table.add_column(headers.get(column, column), justify="left" if column == "candidate" else "right")
    table.add_column("gate")
    for row in rows:
        cells = [
            f"{row[c]:.4f}" if c in metric_columns and row[c] is not None else ("–" if row[c] is None else str(row[c]))
            for c in columns
        ]
        gate = (
            "[bold green]chosen[/]"
            if row["chosen"]
            else (
                "[green]eligible[/]"
                if row["eligible"]
                else ("baseline" if row.get("role") == "baseline" else "[red]rejected[/]")
            )
        )
        table.add_row(*cells, gate)
    console.print(table)
    for row in rows:
        console.print(f"  {row['candidate']}: {row['reasons']}", highlight=False)
    decision = summary["decision"]
    console.print(f"[bold]{decision['summary']}[/bold]", highlight=False)
    if summary.get("champion_dir"):
        console.print(f"champion: {summary['champion_dir']}", highlight=False)


@domains_app.callback()
def domains(
    ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of text.")
) -> None:
    """List the known domains (with no sub-command)."""
    if ctx.invoked_subcommand is not None:
        return
    from domainflow.catalog import catalog

    try:
        entries = catalog()
    except DomainFileError as exc:
        fail(str(exc))
    for name, entry in sorted(entries.items()):
        spec = entry.spec
        labels = getattr(spec, "label_names", None)
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "name": name,
                        "task_kind": spec.task_kind,
                        "description": spec.description,
                        "origin": entry.origin,
                        "labels": list(labels) if labels else None,
                        "primary_metric": spec.primary_metric,
                    }
                )
            )
        else:
            shown = (
                f"{len(labels)} labels"
                if labels
                else ("labels from the data" if hasattr(spec, "label_names") else spec.task_kind)
            )
            console.print(
                f"[bold]{name}[/bold]: {spec.description} ({shown}; primary metric {spec.primary_metric}; from "
                f"{entry.origin})",
                highlight=False,
            )


@domains_app.command("add")
def domains_add(
    file: Path = typer.Argument(..., help="A domain file (TOML)."),
    replace: bool = typer.Option(False, "--replace", help="Take the name even if another domain has it."),
) -> None:
    """Record a domain file under DOMAINFLOW_HOME, so every command and scheduled run knows it by name."""
    from domainflow.catalog import add_domain_file

    try:
        spec = add_domain_file(file, replace=replace)
    except DomainFileError as exc:
        fail(str(exc))
    console.print(
        f"added {spec.name} ({spec.task_kind}) from {file.resolve()}: try `domainflow run {spec.name}`", highlight=False
    )


@domains_app.command("remove")
def domains_remove(name: str = typer.Argument(..., help="A domain added with `domains add`.")) -> None:
    """Forget an added domain (its file, models and registry stay where they are)."""
    from domainflow.catalog import UnknownDomainError, remove_domain

    try:
        path = remove_domain(name)
    except UnknownDomainError as exc:
        fail(str(exc))
    console.print(f"removed {name} (its file {path} is untouched)", highlight=False)


@domains_app.command("fields")
def domains_fields(
    kind: str = typer.Option("text_classification", help="Task kind: text_classification or ranking."),
) -> None:
    """Every key a domain file may set, with its default and meaning."""
    from domainflow.domain_files import field_rows
    from domainflow.kinds import UnknownKindError, kind_of

    try:
        spec_type = kind_of(kind).spec_type
    except UnknownKindError as exc:
        fail(str(exc))
    table = Table(title=f"domain file keys ({kind})")
    for column in ("key", "default", "meaning"):
        table.add_column(column)
    for key, default, meaning in field_rows(spec_type):
        table.add_row(key, default, meaning)
    console.print(table)


@domains_app.command("show")
def domains_show(domain: str = typer.Argument(..., help="A domain name or file.")) -> None:
    """Every field of a domain, defaults filled in, as JSON."""
    spec = _domain_spec(domain)
    typer.echo(json.dumps(spec.model_dump(mode="json", by_alias=True), indent=2))


@app.command()
def predict(
    domain: str = typer.Argument(..., help="Domain whose champion answers."),
    texts: list[str] = typer.Argument(..., help="One or more texts."),
    top_k: int = typer.Option(3, min=1, help="Labels to show per text."),
) -> None:
    """Classify TEXTS with the domain's champion and show what the domain would do with each prediction."""
    from domainflow.kinds import kind_of
    from domainflow.modeling import load_classifier
    from domainflow.outofscope import OutOfScopeDetector
    from domainflow.retrieval import QuestionIndex
    from serving.inference import prediction_record, score_texts

    spec = _domain_spec(domain)
    domain = spec.name
    if kind_of(spec).cli_verb != "predict":
        fail(f"{domain} is a {spec.task_kind} domain: use `{kind_of(spec).usage.format(domain=domain)}`")
    spec = spec.as_kind(ClassificationSpec)
    champion = _champion_of(domain)
    loaded = load_classifier(champion.model_dir)
    index = QuestionIndex.load(champion.model_dir) if spec.retrieval is not None else None
    # as the service does: a champion promoted before detection was turned on has no detector and flags nothing
    detecting = spec.out_of_scope is not None and spec.out_of_scope.enabled
    detector = OutOfScopeDetector.load(champion.model_dir) if detecting else None
    scored = score_texts(loaded, index, spec, list(texts), top_k, detector)
    results = [
        {"text": text, **prediction_record(spec, text, scores, top_k, ndigits=4)}
        for text, scores in zip(texts, scored, strict=True)
    ]
    console.print_json(json.dumps({"domain": domain, "version": champion.version, "predictions": results}))


def _champion_of(domain: str) -> VersionInfo:
    """The domain's champion (its files checked against the version's manifest), or exit with why there is none."""
    from domainflow.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(domain)
    try:
        champion = registry.load_champion()
    except RegistryError as exc:
        fail(str(exc))
    if champion is None:
        fail(f"no champion for {domain}: {registry.no_champion_hint()}")
    return champion


@app.command()
def explain(
    domain: str = typer.Argument(..., help="Domain whose champion answers."),
    text: str = typer.Argument(..., help="The text to explain."),
    method: str = typer.Option(
        "occlusion",
        "--method",
        help="occlusion (leave one word out: explains the champion itself, int8 included) or integrated_gradients "
        "(captum; only for a champion with fp32 torch weights).",
    ),
    label: str | None = typer.Option(None, "--label", help="Another label to explain as well."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer of POST /v1/DOMAIN/explain instead."),
) -> None:
    """Why the champion classifies TEXT as it does: each word shaded by how much it raises the label's log-odds
    (green for, red against)."""
    from domainflow.explain import explain_text, render_explanation
    from domainflow.kinds import kind_of
    from domainflow.modeling import load_classifier

    spec = _domain_spec(domain)
    domain = spec.name
    if kind_of(spec).cli_verb != "predict":
        fail(f"{domain} is a {spec.task_kind} domain: only classifier domains are explained")
    champion = _champion_of(domain)
    try:
        explanation = explain_text(load_classifier(champion.model_dir), text, method, label)
    except ValueError as exc:  # an empty text, an unknown method or label, a method that cannot explain this model
        fail(f"{domain} v{champion.version}: {exc}")
    if as_json:
        typer.echo(json.dumps({"domain": domain, "version": champion.version, **explanation.as_dict(digits=4)}))
        return
    console.print(f"{domain} v{champion.version} ({champion.lineage.get('candidate')})", highlight=False)
    console.print(render_explanation(explanation), highlight=False)


@app.command()
def recommend(
    domain: str = typer.Argument(..., help="A ranking domain (a name or a domain file), e.g. recommendation."),
    history: list[str] | None = typer.Argument(None, help="Item ids the user interacted with, oldest first."),
    text: list[str] | None = typer.Option(
        None, "--text", help="Free text about what the user liked, read as the most recent history (repeatable)."
    ),
    candidate: list[str] | None = typer.Option(
        None, "--candidate", help="An item id to rank (repeatable; default: every item not in the history)."
    ),
    top_k: int = typer.Option(10, min=1, max=100, help="How many items to show."),
) -> None:
    """Rank items for a history with the domain's champion: the same answer as POST /v1/DOMAIN/rank."""
    from domainflow.kinds import kind_of
    from domainflow.recsys.bundle import Recommender
    from domainflow.recsys.spec import RankingSpec
    from serving.ranking import rank_record

    spec = _domain_spec(domain)
    domain = spec.name
    if kind_of(spec).cli_verb != "recommend":
        fail(f"{domain} is a {spec.task_kind} domain: use `{kind_of(spec).usage.format(domain=domain)}`")
    spec = spec.as_kind(RankingSpec)
    champion = _champion_of(domain)
    recommender = Recommender(champion.model_dir, spec.history_text)
    try:
        items = recommender.recommend(history=history or [], texts=text or [], candidates=candidate or None, k=top_k)
    except ValueError as exc:  # empty history, unknown item ids
        fail(str(exc))
    console.print_json(
        json.dumps(rank_record(domain, champion.version, recommender.scorer_for(history or []), items, ndigits=4))
    )


@registry_app.command("list")
def registry_list(
    domain: str = typer.Argument(..., help="Domain (a name or a domain file)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per version instead of a table."),
) -> None:
    """List a domain's versions; the champion is marked."""
    from domainflow.registry import ModelRegistry, RegistryError

    domain = domain_name(domain)
    registry = ModelRegistry(domain)
    try:
        champion = registry.champion()
        versions = registry.versions()
    except RegistryError as exc:
        fail(str(exc))
    if as_json:
        for info in versions:
            record = {
                "version": info.version,
                "champion": bool(champion and champion.version == info.version),
                "candidate": info.lineage.get("candidate"),
                "created_at": info.created_at,
                "metrics": info.metrics,
                "path": str(info.path),
            }
            typer.echo(json.dumps(record, default=str))
        return
    if not versions:
        console.print(f"no versions registered for {domain}")
        return
    table = Table(title=f"{domain} registry")
    for column in ("version", "champion", "candidate", "created", "metrics"):
        table.add_column(column)
    for info in versions:
        metrics = info.metrics.get("test", info.metrics)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        table.add_row(
            str(info.version),
            "*" if champion and champion.version == info.version else "",
            str(info.lineage.get("candidate", "")),
            info.created_at,
            shown,
        )
    console.print(table)


@registry_app.command("show")
def registry_show(
    domain: str = typer.Argument(..., help="Domain (a name or a domain file)."),
    version: int | None = typer.Option(None, help="Version (default: the champion)."),
) -> None:
    """Show one version's metrics, lineage and location as JSON."""
    from domainflow.registry import ModelRegistry, RegistryError

    domain = domain_name(domain)
    registry = ModelRegistry(domain)
    try:
        info = registry.get(version) if version is not None else registry.champion()
    except RegistryError as exc:
        fail(str(exc))
    if info is None:
        fail(f"no champion for {domain}: {registry.no_champion_hint()}")
    typer.echo(
        json.dumps(
            {
                "version": info.version,
                "path": str(info.path),
                "created_at": info.created_at,
                "metrics": info.metrics,
                "lineage": info.lineage,
            },
            indent=2,
            default=str,
        )
    )


@registry_app.command("history")
def registry_history(
    domain: str = typer.Argument(..., help="Domain (a name or a domain file)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line (JSON lines), for tools."),
) -> None:
    """Every promotion, rejection and rollback, oldest first."""
    from domainflow.registry import ModelRegistry, RegistryError

    domain = domain_name(domain)
    try:
        events = ModelRegistry(domain).history()
    except RegistryError as exc:
        fail(str(exc))
    for event in events:
        if as_json:
            typer.echo(json.dumps(event, default=str))
        else:
            console.print_json(json.dumps(event, default=str))


@registry_app.command("rollback")
def registry_rollback(
    domain: str = typer.Argument(..., help="Domain (a name or a domain file)."),
    to: int | None = typer.Option(None, "--to", help="Version to restore (default: the previous champion)."),
    reason: str = typer.Option("manual rollback", help="Why, for the history."),
) -> None:
    """Make an earlier version the champion again (atomic; recorded in the history)."""
    from domainflow.registry import ModelRegistry, RegistryError

    domain = domain_name(domain)
    try:
        info = ModelRegistry(domain).rollback(to, reason=reason)
    except RegistryError as exc:
        fail(str(exc))
    console.print(f"{domain}: champion is now version {info.version} ({info.path})", highlight=False)


@registry_app.command("repair")
def registry_repair(domain: str = typer.Argument(..., help="Domain (a name or a domain file).")) -> None:
    """Repair a domain's registry after a crash or a disk error, and check it.

    Rewrites the history without unreadable lines (keeping history.jsonl.bak-<timestamp>), records an
    interrupted promotion or rollback as aborted, removes temp leftovers, and checks that champion.json
    points at an existing version whose files match its manifest. Never changes the champion.
    Exit 0 when the registry is consistent afterwards, 2 when it is not."""
    from domainflow.registry import ModelRegistry, RegistryError

    domain = domain_name(domain)
    try:
        report = ModelRegistry(domain).repair()
    except RegistryError as exc:
        fail(str(exc))
    for line in report.lines():
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if not report.consistent:
        fail(f"{domain}: the registry is not consistent after repair: {report.problem}")


@registry_app.command("export")
def registry_export(
    domain: str = typer.Argument(..., help="Domain (a name or a domain file)."),
    mlflow_uri: str = typer.Option(
        ...,
        "--mlflow",
        help="MLflow tracking and model registry URI: http(s)://HOST:PORT (a server), sqlite:///path/mlflow.db …",
    ),
    name: str | None = typer.Option(None, "--name", help="Registered model name (default: domainflow-DOMAIN)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Log DOMAIN's champion to an MLflow model registry: a run (lineage, metrics, model), a model version and
    the alias `champion` on it. Exporting the same champion again only re-points the alias.

    Load it with mlflow.pyfunc.load_model("models:/domainflow-DOMAIN@champion").predict(texts) (needs
    domainflow installed). Exit 2: no champion, not a text classification domain, or mlflow missing; 5: the
    champion's files are damaged; 1: MLflow refused or could not be reached."""
    from domainflow.mlflow_export import ExportError, ExportRefusedError, NoChampionError, export_champion
    from domainflow.registry import RegistryError

    domain = domain_name(domain)
    try:
        result = export_champion(domain, mlflow_uri, name=name)
    except (NoChampionError, ExportRefusedError) as exc:
        fail(str(exc))
    except RegistryError as exc:
        fail(f"registry: {exc}", EXIT_REGISTRY)
    except ExportError as exc:
        fail(str(exc), 1)
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
        return
    what = "registered as new version" if result.created else "already exported: version"
    console.print(
        f"{domain} v{result.domainflow_version} {what} {result.model_version} of {result.name} at {mlflow_uri}; "
        f"alias {result.alias} → version {result.model_version} ({result.model_uri})",
        highlight=False,
    )


def _domain_spec(domain: str) -> DomainSpec:
    """The domain a command was given (a name or a file; a file's domain is then known by name here)."""
    from domainflow.catalog import get_domain

    return get_domain(domain_name(domain))


def _register_operations() -> None:
    """serve / schedule / ui (flows/ops_cli.py) and the monitoring sub-commands (flows/monitor_cli.py)."""
    from flows.monitor_cli import monitor_app
    from flows.ops_cli import schedule, serve, ui

    app.command()(serve)
    app.command()(schedule)
    app.command()(ui)
    app.add_typer(monitor_app, name="monitor")


_register_operations()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
