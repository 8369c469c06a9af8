"""Where a run's tasks execute: Prefect's thread pool (default), a Dask cluster or a Ray cluster; and several
domains at once, as subflows of one parent flow.

The pipelines submit the steps that do not depend on each other (the evaluations of the candidates, the
compressions of the reference model) and resolve the futures afterwards, so a runner with several workers runs
them side by side. Which runner a flow gets is chosen here, once per command:

* ``default`` — Prefect's ``ThreadPoolTaskRunner`` with **one** thread unless ``--workers`` says more. One
  training step already keeps both cores of a small machine busy (torch's own threads): a second step beside
  it would only slow both down, and two trainings in one process share torch's global random generator, so
  their results would depend on timing. One thread keeps a run identical to the sequential pipeline (same
  steps, same order, same weights); several domains then run one after the other. ``--workers N`` allows N
  steps (and N domains) at once in this process, at the price of that reproducibility.
* ``dask`` — prefect-dask's ``DaskTaskRunner``; an existing scheduler (``--dask-address``) or a local cluster
  of worker *processes* with one task each (``--workers``, default: the CPU count), torch's threads split
  between them.
* ``ray`` — prefect-ray's ``RayTaskRunner``; an existing cluster (``--ray-address``) or a local one.

The rule every runner obeys (:data:`tasks.caching.SHARED_HOME_RULE`): tasks hand each other absolute paths
under the domainflow home, so every worker must see **one shared DOMAINFLOW_HOME (and the domains' data) at
the same path** as the process that starts the run. Before the first task, :func:`start_runner` checks it on
every worker (the worker reads a file this process just wrote in the home, and reaches Prefect's API); each
task also checks the paths it receives (``require_shared``) and fails naming the path and the rule.

Workers report their task runs to Prefect's API, so a run on Dask or Ray needs one API that every worker can
reach: ``PREFECT_API_URL`` when set (a ``prefect server``, e.g. ``domainflow ui``), else this process's
temporary server, whose address is handed to the workers (it listens on 127.0.0.1: local clusters only).
"""

from __future__ import annotations

import inspect
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Literal, cast

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.states import Completed, Failed, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel

from domainflow import process_locks, settings
from tasks.caching import SHARED_HOME_RULE

# prefect-dask / distributed and prefect-ray / ray come with the optional `dask` and `ray` extras: they are imported
# only where a run asks for them (their `type: ignore`s let mypy pass with or without them installed).
RunnerKind = Literal["default", "dask", "ray"]
TASK_RUNNERS: tuple[str, ...] = ("default", "dask", "ray")

#: Environment a local cluster's workers (and a Ray job's workers) get from this process: where the home is,
#: the offline switches and thread settings that ``configure_environment`` chose.
WORKER_ENV_PREFIXES = ("DOMAINFLOW_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_WAIT_POLICY")


class ClusterSetupError(ValueError):
    """The chosen runner cannot run domainflow tasks: unreachable, or a worker breaks the shared-home rule."""


class RunnerPlan(BaseModel):
    """The runner a command chose, started: enough to make a fresh task runner for each flow run."""

    kind: RunnerKind = "default"
    address: str | None = None  # the Dask scheduler or Ray cluster every flow of the command connects to
    workers: int = 1  # threads (default) or worker processes / CPUs (a local cluster); informative otherwise

    def task_runner(self) -> TaskRunner[PrefectFuture[Any]]:
        """A new task runner for one flow run (Prefect starts and stops it with the run)."""
        if self.kind == "dask":
            from prefect_dask import DaskTaskRunner  # type: ignore[import-not-found, import-untyped, unused-ignore]

            return cast(TaskRunner[PrefectFuture[Any]], DaskTaskRunner(address=self.address))
        if self.kind == "ray":
            from prefect_ray import RayTaskRunner  # type: ignore[import-not-found, import-untyped, unused-ignore]

            return RayTaskRunner(address=self.address)  # Ray is already initialised by start_runner: reused
        return thread_pool(self.workers)

    def describe(self) -> str:
        where = f" at {self.address}" if self.address else ""
        unit = "thread" if self.kind == "default" else "worker"
        return f"{self.kind}{where} ({self.workers} {unit}{'s' if self.workers != 1 else ''})"


def thread_pool(workers: int = 1) -> TaskRunner[PrefectFuture[Any]]:
    """Prefect's thread pool with ``workers`` threads: the default runner (one thread, see above)."""
    return cast(TaskRunner[PrefectFuture[Any]], ThreadPoolTaskRunner(max_workers=workers))


def runner_name() -> str | None:
    """The class name of the task runner of the flow run this is called in (``ThreadPoolTaskRunner``,
    ``DaskTaskRunner``, ``RayTaskRunner``): a run's summary says where its tasks ran."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    runner = getattr(context, "task_runner", None) if context else None
    return type(runner).__name__ if runner is not None else None


# ------------------------------------------------------------------------------------ starting a runner


@contextmanager
def start_runner(
    kind: str = "default", *, address: str | None = None, workers: int | None = None
) -> Iterator[RunnerPlan]:
    """Start what ``kind`` needs for the whole command (a local cluster, an API the workers can reach), check
    the shared-home rule on every worker, and yield the plan every flow of the command uses."""
    if kind not in TASK_RUNNERS:
        raise ClusterSetupError(f"unknown task runner {kind!r}; known: {', '.join(TASK_RUNNERS)}")
    if address and kind == "default":
        raise ClusterSetupError("an address needs --task-runner dask or ray")
    if workers is not None and workers < 1:
        raise ClusterSetupError(f"--workers must be at least 1, got {workers}")
    if kind == "default":
        yield RunnerPlan(kind="default", workers=workers or 1)
        return
    with ExitStack() as stack:
        api_url = stack.enter_context(_api_for_workers())
        if kind == "dask":
            plan = stack.enter_context(_dask(address, workers, api_url))
        else:
            plan = stack.enter_context(_ray(address, workers, api_url))
        yield plan


def worker_environment(threads: int | None = None) -> dict[str, str]:
    """The variables a worker needs from this process; ``threads`` caps torch's and BLAS's threads per worker
    (a local cluster splits the CPUs between its workers instead of letting each take them all)."""
    env = {key: value for key, value in os.environ.items() if key.startswith(WORKER_ENV_PREFIXES)}
    env["DOMAINFLOW_HOME"] = str(settings.home())  # absolute: a worker's working folder may differ
    if threads is not None:
        env.update({name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    return env


def _local_split(workers: int | None) -> tuple[int, int]:
    """(worker processes, threads each) for a local cluster: by default one worker per CPU, one thread each."""
    cpus = os.cpu_count() or 1
    count = workers or cpus
    return count, max(1, cpus // count)


@contextmanager
def _api_for_workers() -> Iterator[str]:
    """The Prefect API the workers report to: ``PREFECT_API_URL``, or this process's temporary server, started
    now and named in the settings every task run carries to its worker (else each worker process would start
    a temporary server of its own, ~10 s each, on the same database)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    configured = get_current_settings().api.url
    if configured:
        yield str(configured)
        return
    from prefect.server.api.server import SubprocessASGIServer

    from flows.prefect_server import tether_ephemeral_server

    tether_ephemeral_server()
    server = SubprocessASGIServer()  # the instance Prefect itself would use (tethered to this process)
    server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.api_url


@contextmanager
def _dask(address: str | None, workers: int | None, api_url: str) -> Iterator[RunnerPlan]:
    import logging

    import distributed  # type: ignore[import-not-found, import-untyped, unused-ignore]

    with ExitStack() as stack:
        # The scheduler's and client's INFO lines (every connection, every worker) would drown the run's own.
        quiet = logging.getLogger("distributed")
        stack.callback(quiet.setLevel, quiet.level)
        quiet.setLevel(logging.WARNING)
        local = address is None
        if address is None:
            count, threads = _local_split(workers)
            cluster = stack.enter_context(
                distributed.LocalCluster(
                    n_workers=count,
                    threads_per_worker=1,  # one task per process: no two trainings share torch's random state
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                    env={**worker_environment(threads), "DASK_LOGGING__DISTRIBUTED": "warning"},
                )
            )
            address = cluster.scheduler_address
        try:
            client = stack.enter_context(distributed.Client(address, timeout=30, set_as_default=False))
        except OSError as exc:
            raise ClusterSetupError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
        if local:  # runs first on the way out, before the cluster closes (an ExitStack unwinds in reverse)
            stack.callback(client.run, drain_prefect_services)
        token, marker = _write_marker()
        try:
            views = client.run(worker_view, str(marker), api_url)
        finally:
            marker.unlink(missing_ok=True)
        if not views:
            raise ClusterSetupError(f"the Dask cluster at {address} has no workers")
        check_worker_views(views, token, f"Dask scheduler {address}", api_url)
        yield RunnerPlan(kind="dask", address=address, workers=len(views))


@contextmanager
def _ray(address: str | None, workers: int | None, api_url: str) -> Iterator[RunnerPlan]:
    import ray  # type: ignore[import-not-found, import-untyped, unused-ignore]

    if ray.is_initialized():
        raise ClusterSetupError("Ray is already initialised in this process; domainflow starts its own connection")
    if address is None:
        count, threads = _local_split(workers)
        ray.init(
            num_cpus=count,
            include_dashboard=False,
            runtime_env={"env_vars": worker_environment(threads)},
            namespace="prefect",
        )
    else:
        try:
            ray.init(address=address, runtime_env={"env_vars": worker_environment()}, namespace="prefect")
        except (ConnectionError, RuntimeError) as exc:
            raise ClusterSetupError(f"cannot reach the Ray cluster at {address}: {exc}") from exc
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # type: ignore[import-not-found, import-untyped, unused-ignore]

        token, marker = _write_marker()
        try:
            view = ray.remote(num_cpus=0)(worker_view)
            nodes = [node["NodeID"] for node in ray.nodes() if node.get("Alive")]
            pending = {
                node: view.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                    str(marker), api_url
                )
                for node in nodes
            }
            views = {f"node {node[:12]}": ray.get(ref) for node, ref in pending.items()}
        finally:
            marker.unlink(missing_ok=True)
        check_worker_views(views, token, f"Ray cluster {address or '(local)'}", api_url)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        yield RunnerPlan(kind="ray", address=address, workers=cpus)
    finally:
        ray.shutdown()


async def drain_prefect_services() -> None:
    """Runs on a worker before its cluster closes: send the task runs' last logs and state events to the API and
    stop the threads that send them (otherwise the worker outlives the nanny's 4 s grace and is killed with them
    unsent). A coroutine because Dask's ``client.run`` calls it on the worker's event loop, where Prefect's
    ``drain_all`` returns an awaitable instead of waiting (a plain function dropped it: nothing was drained)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        pending = service.drain_all(timeout=30)
        if inspect.isawaitable(pending):
            await pending


# ------------------------------------------------------------------------------ the shared-home check


def _write_marker() -> tuple[str, Path]:
    """A file with a fresh token in the home: a worker that reads the token sees this very home."""
    token = uuid.uuid4().hex
    folder = settings.home() / "runner-checks"
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{token}.txt"
    marker.write_text(token)
    return token, marker


def worker_view(marker: str, api_url: str) -> dict[str, Any]:
    """Runs on a worker: its host and home, the marker's token if the file is visible there, and whether
    Prefect's API answers from there."""
    import httpx

    try:
        token: str | None = Path(marker).read_text()
    except OSError:
        token = None
    try:
        api_ok = httpx.get(f"{api_url.rstrip('/')}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        api_ok = False
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "home": str(settings.home()),
        "token": token,
        "api": api_ok,
    }


def check_worker_views(views: dict[str, dict[str, Any]], token: str, where: str, api_url: str) -> None:
    """Raise :class:`ClusterSetupError` naming every worker that breaks the rule, and how."""
    home = str(settings.home())
    problems = []
    for worker, view in sorted(views.items()):
        if view["home"] != home:
            problems.append(f"{worker} on {view['host']}: DOMAINFLOW_HOME is {view['home']}, not {home}")
        elif view["token"] != token:
            problems.append(f"{worker} on {view['host']}: cannot read {home} (not the same shared folder)")
        if not view["api"]:
            problems.append(
                f"{worker} on {view['host']}: cannot reach Prefect's API at {api_url} (set PREFECT_API_URL to a "
                "Prefect server every worker can reach)"
            )
    if problems:
        raise ClusterSetupError(
            f"{where}: {len(problems)} worker problem(s): " + "; ".join(problems) + f". The rule: {SHARED_HOME_RULE}."
        )


# ------------------------------------------------------------------------------------ several domains


@task(name="domain-run", cache_policy=NO_CACHE, persist_result=False)
def domain_run(domain: str, plan: RunnerPlan, options: dict[str, Any]) -> dict[str, Any]:
    """One domain's pipeline, as a subflow on the command's runner (its own lock, registry and run folder)."""
    from flows.pipeline import pipeline_for

    with process_locks.PARSING:  # a new flow object parses its docstring (see domainflow.process_locks)
        pipeline = pipeline_for(domain).with_options(task_runner=plan.task_runner())
    return pipeline(domain=domain, **options)


class DomainsReport(BaseModel):
    """What a run of several domains did: each domain's summary, or the error that stopped it."""

    task_runner: str
    summaries: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    error_types: dict[str, list[str]] = {}  # the error's class and its bases: the CLI's exit code reads them


@flow(name="domains-pipeline", log_prints=True)
def domains_pipeline(domains: list[str], plan: RunnerPlan, options: dict[str, Any]) -> State:
    """Every domain's pipeline at once, as subflows; one failing domain stops none of the others.

    Returns a Completed state when every domain finished, else a Failed one naming the failed domains; either
    way its data is a :class:`DomainsReport`.
    """
    from domainflow.catalog import get_domain

    log = get_run_logger()
    futures = {get_domain(domain).name: domain_run.submit(domain, plan, options) for domain in domains}
    report = DomainsReport(task_runner=plan.describe())
    for domain, future in futures.items():
        future.wait()
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            log.error("%s failed: %s", domain, outcome)
            report.errors[domain] = str(outcome)
            report.error_types[domain] = [klass.__name__ for klass in type(outcome).__mro__]
        else:
            report.summaries[domain] = outcome
    if report.errors:
        return Failed(message=f"failed: {', '.join(report.errors)}", data=report)
    return Completed(message=f"{len(domains)} domain(s) done", data=report)


def run_domains(domains: list[str], plan: RunnerPlan, options: dict[str, Any]) -> DomainsReport:
    """Run :func:`domains_pipeline` and return its report, failed or not.

    The parent's own threads only wait for the subflows: on a cluster every domain starts at once; with the
    default runner as many domains run at once as it has threads (one by default: one after another)."""
    at_once = plan.workers if plan.kind == "default" else len(domains)
    parent = domains_pipeline.with_options(task_runner=thread_pool(max(1, at_once)))
    state = parent(domains=domains, plan=plan, options=options, return_state=True)
    report = state.result(raise_on_failure=False)
    if not isinstance(report, DomainsReport):  # the parent itself crashed before it could report
        raise report if isinstance(report, BaseException) else RuntimeError(f"domains-pipeline ended {state.name}")
    return report
