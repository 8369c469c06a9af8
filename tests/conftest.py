"""Shared fixtures: an isolated domainflow home, a truncated real MiniLM, and a tiny Banking77 domain.

The home (and so Prefect's database, results and the registry) lives in a fresh
temporary folder per test session, set *before* Prefect is imported.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from tests.data_helpers import replace

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="domainflow-tests-"))
os.environ["DOMAINFLOW_HOME"] = str(_SESSION_HOME)
os.environ["DOMAINFLOW_ONLINE"] = "0"
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_SESSION_HOME / "results")
os.environ.pop("PREFECT_API_URL", None)

from domainflow.settings import configure_environment  # noqa: E402

configure_environment()

import pytest  # noqa: E402

from domainflow.catalog import get_domain, register  # noqa: E402
from tests.data_helpers import banking77_slice, write_csv  # noqa: E402
from tests.finance_helpers import tiny_finance  # noqa: E402, F401  (a fixture: the finance and monitor tests share it)

TINY_DOMAIN = "cs_tiny"
TINY_LABELS = [
    "card_arrival",
    "lost_or_stolen_card",
    "exchange_rate",
    "top_up_failed",
    "pin_blocked",
    "cash_withdrawal_charge",
]


@pytest.fixture(scope="session", autouse=True)
def _prefect_logs_outlive_each_invocation() -> None:
    """Prefect's log handler is bound to the stream current at its first flow run: set it up now, so that a
    first run inside ``CliRunner.invoke`` (whose stream closes after it) cannot break every later run."""
    from tests.process_helpers import prefect_logging_on_this_stream

    prefect_logging_on_this_stream()


@pytest.fixture(scope="session")
def session_home() -> Path:
    return _SESSION_HOME


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real all-MiniLM-L6-v2 weights cut to its first two layers: real tokenizer and weights, 3x faster,
    and still deep enough to distil into a one-layer student."""
    from domainflow.modeling import load_encoder, resolve_base_model

    out = tmp_path_factory.mktemp("minilm-2layers")
    encoder, tokenizer = load_encoder(resolve_base_model(None), num_layers=2)
    encoder.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_domain() -> str:
    """customer_service restricted in practice to six intents, with floors a 1-layer model can meet."""
    spec = get_domain("customer_service")
    register(
        replace(
            spec,
            name=TINY_DOMAIN,
            description="Banking77, six intents (tests)",
            gates=replace(spec.gates, min_metrics={"accuracy": 0.5}),
            training=replace(spec.training, epochs=1.0, batch_size=16),
            compression=replace(spec.compression, student_layers=1, recovery_epochs=1.0),
            peft=replace(spec.peft, methods=()),  # off as shipped too; tests/test_peft.py trains LoRA/IA3
            ensemble=None,  # off as shipped too; tests/test_fusion.py tests ensembles
            min_examples_per_class=3,
            # Off here: calibrated on ~14 validation texts it would escalate some in-scope test texts, which the
            # answer-policy tests do not expect; tests/test_out_of_scope.py tests it on domains of its own.
            out_of_scope=None,
        )
    )
    return TINY_DOMAIN


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.csv / test.csv with real Banking77 rows of the six intents."""
    out = tmp_path_factory.mktemp("banking77-slice")
    write_csv(out / "train.csv", banking77_slice("train", TINY_LABELS, 24))
    write_csv(out / "test.csv", banking77_slice("test", TINY_LABELS, 12))
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tiny_domain: str, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny domain's slice ingested once (train/validation/test splits, seed 7), shared read-only."""
    from tasks.ingest import ingest_dataset

    spec = get_domain(tiny_domain)
    return ingest_dataset(
        spec.data_slice(),
        spec.name,
        tmp_path_factory.mktemp("tiny-dataset"),
        train_path=tiny_data_dir / "train.csv",
        test_path=tiny_data_dir / "test.csv",
        seed=7,
    )


@pytest.fixture(scope="session")
def tiny_probe(tiny_domain: str, tiny_model_dir: Path, tiny_dataset, tmp_path_factory: pytest.TempPathFactory):
    """A real six-intent classifier (two-layer MiniLM + logistic-regression head) trained once on the tiny
    dataset (seed 7) and saved by domainflow: for tests that need *a* model, not a particular training."""
    from tasks.finetune import make_train_config, train_linear_probe

    config = make_train_config(get_domain(tiny_domain), str(tiny_model_dir), epochs=1.0, seed=7)
    return train_linear_probe(tiny_dataset, config, tmp_path_factory.mktemp("tiny-probe") / "linear_probe")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop Prefect's ephemeral API server while pytest's streams are still open.

    Otherwise Prefect stops it from an atexit hook, after pytest has closed the captured
    stream its log handler writes to, and prints a logging traceback at the end of every run.
    """
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=5)  # deliver pending run logs before their server goes away
    logging.disable(logging.INFO)  # the "stopping server" line would go to pytest's closed capture stream
    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()
    # The session's DOMAINFLOW_HOME holds every model the tests trained (up to ~2.5 GB): a developer running the
    # suite often filled /tmp with them. DOMAINFLOW_KEEP_TEST_HOME=1 keeps it for a post-mortem.
    if os.environ.get("DOMAINFLOW_KEEP_TEST_HOME") != "1":
        shutil.rmtree(_SESSION_HOME, ignore_errors=True)
