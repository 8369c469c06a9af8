"""The prediction service on a real uvicorn server on 127.0.0.1, with tiny champions built from the
real MiniLM cut to one layer and promoted into a temporary registry.

What must hold: keys guard /v1 (and are checked before the body is read), bad input is a 4xx with
a message (never a 5xx), every text gets *its own* prediction even when concurrent requests are
merged into one model call, and a promotion swaps the model under load without a failed request,
while a champion that cannot load leaves the previous one serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from typer.testing import CliRunner

from domainflow.catalog import get_domain
from domainflow.modeling import TextClassifier, load_classifier, load_encoder, predict_proba, save_classifier
from domainflow.registry import ModelRegistry
from serving import ApiKeys, AuthConfigError, ServingConfig, create_app
from serving.auth import read_keys_file
from serving.batching import DeadlineExceededError, MicroBatcher, QueueFullError
from serving.schemas import DomainsResponse, PredictResponse
from tests.conftest import TINY_LABELS
from tests.data_helpers import banking77_rows
from tests.process_helpers import ThreadedUvicorn, wait_for

ESCALATION_REPLY = get_domain("customer_service").answers.escalation_reply
REPLY_TEMPLATES = get_domain("customer_service").answers.replies

KEY = "test-key-7f3a9c2e5b8d1f4a"
OTHER_KEY = "second-key-0a1b2c3d4e5f6a7b"
FAVOURED = "exchange_rate"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ helpers


def make_classifier_dir(
    encoder_dir: Path,
    out: Path,
    label_names: list[str],
    *,
    seed: int = 0,
    scale: float = 1.5,
    favour: str | None = None,
) -> Path:
    """A model directory in the registry's format: the given encoder and a seeded random head.

    ``scale`` sets how peaked the probabilities are (1.5 gives a mix of confident and unconfident
    predictions on Banking77 texts with the 1-layer encoder); ``favour`` adds a large bias so that
    every text is classified as that label: a model whose answers are recognisable at a glance.
    """
    encoder, tokenizer = load_encoder(str(encoder_dir))
    model = TextClassifier(encoder, num_labels=len(label_names))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hidden = model.classifier.in_features
        model.classifier.weight.copy_(torch.randn(len(label_names), hidden, generator=generator) * scale / 5.0)
        model.classifier.bias.zero_()
        if favour is not None:
            model.classifier.bias[label_names.index(favour)] = 30.0
    return save_classifier(model, tokenizer, out, label_names=label_names, max_length=64)


def promote(registry: ModelRegistry, model_dir: Path, candidate: str) -> int:
    info = registry.promote(
        model_dir,
        metrics={"test": {"accuracy": 0.5}},
        lineage={"candidate": candidate},
        decision={"summary": f"test promotion of {candidate}"},
    )
    return info.version


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        sample, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', sample))
        if sample.split("{")[0] == name and all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


def expected_predictions(model_dir: Path, texts: list[str]) -> torch.Tensor:
    return predict_proba(load_classifier(model_dir), texts)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def test_texts() -> list[str]:
    """Real Banking77 test texts, a few per intent, in a fixed order."""
    rows = banking77_rows("test")
    texts = []
    for label in TINY_LABELS:
        texts += [r["text"].strip() for r in rows if r["category"] == label][:8]
    return texts


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1: a random head (a mix of replies and escalations); v2: everything is FAVOURED; broken: unloadable weights."""
    root = tmp_path_factory.mktemp("serving-models")
    v1 = make_classifier_dir(tiny_model_dir, root / "v1", TINY_LABELS, seed=0)
    v2 = make_classifier_dir(tiny_model_dir, root / "v2", TINY_LABELS, seed=1, favour=FAVOURED)
    broken = root / "broken"
    shutil.copytree(v2, broken)
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file")
    return {"v1": v1, "v2": v2, "broken": broken}


@pytest.fixture
def start_server(tiny_domain: str) -> Iterator[Callable[..., ThreadedUvicorn]]:
    """Start an app for ``tiny_domain`` on a registry root; every server is stopped afterwards."""
    servers: list[ThreadedUvicorn] = []

    def start(registry_root: Path, **config: Any) -> ThreadedUvicorn:
        settings = {
            "registry_root": registry_root,
            "domains": (tiny_domain,),
            "poll_seconds": 0.2,
            "max_wait_ms": 25.0,
            **config,
        }
        server = ThreadedUvicorn(create_app(ServingConfig(**settings), api_keys=ApiKeys([KEY, OTHER_KEY])))
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def served(
    tiny_domain: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedUvicorn]:
    """One server for the read-only tests: v1 is the champion and stays so."""
    root = tmp_path_factory.mktemp("registry-static")
    promote(ModelRegistry(tiny_domain, root=root / tiny_domain), model_dirs["v1"], "v1")
    server = ThreadedUvicorn(
        create_app(
            ServingConfig(registry_root=root, domains=(tiny_domain,), max_wait_ms=25.0, max_texts=8, max_chars=300),
            api_keys=ApiKeys([KEY]),
        )
    )
    server.start()
    yield server
    server.stop()


# ------------------------------------------------------------------------------------ auth and ops endpoints


def test_keys_come_from_the_environment_and_a_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team A\n{OTHER_KEY}\n\n   \n")
    keys = ApiKeys.from_environment({"DOMAINFLOW_API_KEYS": f" {KEY} ,", "DOMAINFLOW_API_KEYS_FILE": str(keys_file)})
    assert len(keys) == 2 and keys.accepts(KEY) and keys.accepts(OTHER_KEY)
    assert not keys.accepts(KEY[:-1]) and not keys.accepts("") and not keys.accepts(None)
    assert read_keys_file(keys_file) == [OTHER_KEY]
    with pytest.raises(AuthConfigError, match="no API key configured"):
        ApiKeys.from_environment({})
    with pytest.raises(AuthConfigError, match="shorter than 16"):
        ApiKeys(["short"])
    with pytest.raises(AuthConfigError, match="cannot read API keys file"):
        ApiKeys.from_environment({}, keys_file=tmp_path / "missing")


def test_health_is_open_and_v1_needs_a_valid_key(served: ThreadedUvicorn, tiny_domain: str) -> None:
    with httpx.Client(base_url=served.url) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")  # open for probes, but it names no domain without a key
        assert ready.status_code == 200 and ready.json() == {"ready": True}
        ready = client.get("/readyz", headers={"X-API-Key": KEY})
        assert ready.status_code == 200 and ready.json() == {"ready": True, "domains": {tiny_domain: "serving"}}

        body = {"texts": ["Where is my card?"]}
        for headers in (
            {},
            {"X-API-Key": "wrong-key-but-long-enough"},
            {"X-API-Key": KEY.upper()},
            {"Authorization": f"Bearer {KEY}"},
        ):
            for method, path, kwargs in (
                ("POST", f"/v1/{tiny_domain}/predict", {"json": body}),
                ("GET", "/v1/domains", {}),
            ):
                response = client.request(method, path, headers=headers, **kwargs)
                assert response.status_code == 401, (headers, path, response.text)
                assert response.headers["www-authenticate"] == "ApiKey"
                assert "API key" in response.json()["detail"]
        # The key is checked before the body is parsed: a keyless caller learns nothing about it.
        garbage = client.post(
            f"/v1/{tiny_domain}/predict", content=b'{"texts": [', headers={"content-type": "application/json"}
        )
        assert garbage.status_code == 401
        # Unknown paths under /v1 are guarded too (no probing for domain names without a key).
        assert client.post("/v1/no_such_domain/predict", json=body).status_code == 401

        domains = DomainsResponse.model_validate(client.get("/v1/domains", headers={"X-API-Key": KEY}).json())
        (status,) = domains.domains
        assert (
            status.domain,
            status.status,
            status.version,
            status.champion_version,
            status.candidate,
            status.labels,
            status.last_error,
        ) == (tiny_domain, "serving", 1, 1, "v1", len(TINY_LABELS), None)

        metrics = client.get("/metrics", headers={"X-API-Key": KEY})
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        assert metric_value(text, "domainflow_model_version", domain=tiny_domain) == 1.0
        assert (
            metric_value(
                text, "domainflow_requests_total", endpoint="/v1/{domain}/predict", domain=tiny_domain, status="401"
            )
            >= 4
        )
        assert metric_value(text, "domainflow_errors_total", endpoint="/v1/domains", kind="client") >= 4
        assert metric_value(text, "domainflow_request_latency_seconds_count", endpoint="/healthz") >= 1
        assert metric_value(text, "domainflow_model_loads_total", domain=tiny_domain, outcome="loaded") == 1.0


OPS_PATHS = ("/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")


def test_metrics_docs_and_readyz_details_need_a_key_by_default(served: ThreadedUvicorn, tiny_domain: str) -> None:
    """What the service says about itself (domains, versions, traffic, its API) is for key holders; a browser is
    asked for the key (Basic challenge, the key as password) and Prometheus can send it as Basic or Bearer."""
    basic = httpx.BasicAuth("prometheus", KEY)
    with httpx.Client(base_url=served.url) as client:
        for path in OPS_PATHS:
            for kwargs in (
                {},
                {"headers": {"X-API-Key": "wrong-key-but-long-enough"}},
                {"auth": httpx.BasicAuth("prometheus", "wrong-key-but-long-enough")},
                {"headers": {"Authorization": "Basic !!not-base64!!"}},
            ):
                refused = client.get(path, **kwargs)
                assert refused.status_code == 401, (path, kwargs, refused.text)
                assert refused.headers.get_list("www-authenticate") == [
                    "ApiKey",
                    'Basic realm="domainflow", charset="UTF-8"',
                ]
                assert tiny_domain not in refused.text and "domainflow_" not in refused.text
            for kwargs in (
                {"headers": {"X-API-Key": KEY}},
                {"headers": {"Authorization": f"Bearer {KEY}"}},
                {"auth": basic},
            ):
                assert client.get(path, **kwargs).status_code == 200, (path, kwargs)
        metrics = client.get("/metrics", auth=basic).text
        assert metric_value(metrics, "domainflow_model_version", domain=tiny_domain) == 1.0
        assert metric_value(metrics, "domainflow_requests_total", endpoint="/metrics", status="401") >= 4

        assert client.get("/healthz").json() == {"status": "ok"}  # open, and says nothing else
        for kwargs in ({}, {"headers": {"X-API-Key": "wrong-key-but-long-enough"}}):
            ready = client.get("/readyz", **kwargs)
            assert ready.status_code == 200 and ready.json() == {"ready": True}
        detailed = client.get("/readyz", auth=basic)
        assert detailed.json() == {"ready": True, "domains": {tiny_domain: "serving"}}


def test_open_ops_serves_metrics_docs_and_readyz_details_without_a_key(
    start_server, tiny_domain: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--open-ops: the operational endpoints answer anyone (a scrape without credentials); /v1 still needs a key."""
    server = start_server(tmp_path, protect_operational=False)  # no champion: not ready, and it says why
    with httpx.Client(base_url=server.url) as client:
        for path in OPS_PATHS:
            assert client.get(path).status_code == 200, path
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"ready": False, "domains": {tiny_domain: "no_champion"}}
        assert client.get("/v1/domains").status_code == 401

    from flows.ops_cli import ops_app

    started: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append(app))
    home = tmp_path / "home"
    for flag, protected in (("--open-ops", False), (None, True)):
        args = ["serve", "customer_service", "--port", str(free_tcp_port()), *([flag] if flag else [])]
        result = CliRunner().invoke(ops_app, args, env={"DOMAINFLOW_HOME": str(home), "DOMAINFLOW_API_KEYS": KEY})
        assert result.exit_code == 0, result.output
        assert started.pop().state.config.protect_operational is protected


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------------ predictions


def test_predictions_are_the_models_with_replies_and_escalations(
    served: ThreadedUvicorn, tiny_domain: str, model_dirs: dict[str, Path], test_texts: list[str]
) -> None:
    spec = get_domain(tiny_domain)
    texts = test_texts[:8]
    with httpx.Client(base_url=served.url, headers={"X-API-Key": KEY}) as client:
        response = client.post(f"/v1/{tiny_domain}/predict", json={"texts": texts, "top_k": 4})
    assert response.status_code == 200, response.text
    body = PredictResponse.model_validate(response.json())
    assert body.domain == tiny_domain and body.version == 1 and len(body.predictions) == len(texts)

    probabilities = expected_predictions(model_dirs["v1"], texts)
    actions = set()
    for prediction, row in zip(body.predictions, probabilities, strict=True):
        scores, indices = row.topk(4)
        assert [p.label for p in prediction.top_k] == [TINY_LABELS[i] for i in indices.tolist()]
        assert [p.score for p in prediction.top_k] == pytest.approx(scores.tolist(), abs=1e-4)
        assert (prediction.label, prediction.score) == (prediction.top_k[0].label, prediction.top_k[0].score)
        escalate = prediction.score < spec.answers.confidence_threshold
        assert prediction.action == ("escalate" if escalate else "reply")
        assert prediction.reply == (ESCALATION_REPLY if escalate else REPLY_TEMPLATES[prediction.label])
        assert prediction.nearest_question is None  # these versions were registered without a retrieval index
        actions.add(prediction.action)
    assert actions == {"reply", "escalate"}, (
        "the v1 head should give both confident and unconfident answers on these texts"
    )


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
    served: ThreadedUvicorn, tiny_domain: str, model_dirs: dict[str, Path], test_texts: list[str]
) -> None:
    """48 single-text requests at once: fewer model calls than requests, and no answer mixed up."""
    texts = test_texts[:48]
    probabilities = expected_predictions(model_dirs["v1"], texts)

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=served.url, headers={"X-API-Key": KEY}, limits=httpx.Limits(max_connections=48)
        ) as client:
            return await asyncio.gather(
                *(client.post(f"/v1/{tiny_domain}/predict", json={"texts": [t], "top_k": 2}) for t in texts)
            )

    before = httpx.get(f"{served.url}/metrics", headers={"X-API-Key": KEY}).text
    responses = asyncio.run(fire())
    after = httpx.get(f"{served.url}/metrics", headers={"X-API-Key": KEY}).text

    for text, response, row in zip(texts, responses, probabilities, strict=True):
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        assert prediction["label"] == TINY_LABELS[int(row.argmax())], text
        assert prediction["score"] == pytest.approx(float(row.max()), abs=1e-4), text
    calls = metric_value(after, "domainflow_batch_size_texts_count", domain=tiny_domain) - metric_value(
        before, "domainflow_batch_size_texts_count", domain=tiny_domain
    )
    batched = metric_value(after, "domainflow_batch_size_texts_sum", domain=tiny_domain) - metric_value(
        before, "domainflow_batch_size_texts_sum", domain=tiny_domain
    )
    assert batched == 48
    assert 1 <= calls < 48, f"{calls} model calls for 48 concurrent requests: no micro-batching"


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"texts": []}, 422, "at least 1 item"),
        ({"texts": ["   \n\t"]}, 422, "text is empty or only whitespace"),
        ({"texts": [""]}, 422, "at least 1 character"),
        ({"texts": ["ok"] * 9}, 422, "at most 8 items"),
        ({"texts": ["x" * 301]}, 422, "at most 300 characters"),
        ({"texts": [42]}, 422, "texts.0: Input should be a valid string"),
        ({"texts": [None]}, 422, "valid string"),
        ({"texts": "a single string"}, 422, "texts: Input should be a valid list"),
        ({"texts": ["ok"], "top_k": 0}, 422, "greater than or equal to 1"),
        ({"texts": ["ok"], "top_k": 21}, 422, "less than or equal to 20"),
        ({"texts": ["ok"], "top_k": "3"}, 422, "top_k: Input should be a valid integer"),
        ({"texts": ["ok"], "top_k": 2.5}, 422, "valid integer"),
        ({"text": ["ok"]}, 422, "text: Extra inputs are not permitted"),
        ({}, 422, "texts: Field required"),
        ([["ok"]], 422, "valid dictionary"),
        (b'{"texts": ["ok"', 422, "not valid JSON"),
        (b'{"texts": ["\\ud800"]}', 422, "unicode"),
        (b'{"texts": ["\xff\xfe"]}', 400, "error parsing the body"),
        (b"", 422, "Field required"),
        (b'{"texts": ["' + b"x" * 800_000 + b'"]}', 413, "request body over"),
    ],
    ids=lambda value: None if isinstance(value, (dict, list, bytes)) else str(value),
)
def test_bad_input_is_a_4xx_with_a_message(
    served: ThreadedUvicorn, tiny_domain: str, body: Any, status: int, message: str
) -> None:
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    with httpx.Client(base_url=served.url, headers={"X-API-Key": KEY}) as client:
        response = client.post(f"/v1/{tiny_domain}/predict", **kwargs)
    assert response.status_code == status, response.text
    payload = response.json()
    text = payload.get("message") or payload.get("detail")
    assert message.lower() in str(text).lower(), payload
    assert "x" * 100 not in response.text  # the input is not echoed back


def test_unknown_domain_and_wrong_method(served: ThreadedUvicorn) -> None:
    with httpx.Client(base_url=served.url, headers={"X-API-Key": KEY}) as client:
        unknown = client.post("/v1/no_such_domain/predict", json={"texts": ["hello"]})
        assert unknown.status_code == 404 and "unknown domain 'no_such_domain'" in unknown.json()["detail"]
        assert client.get(f"/v1/{'x'}/predict").status_code == 405
        after = client.get("/metrics").text
    assert (
        metric_value(after, "domainflow_requests_total", domain="other", status="404") >= 1
    )  # no label per made-up domain


# ------------------------------------------------------------------------------------ hot swap


def test_promotion_swaps_the_model_under_load_and_a_bad_champion_keeps_the_old(
    start_server, tiny_domain: str, model_dirs: dict[str, Path], test_texts: list[str], tmp_path: Path
) -> None:
    registry = ModelRegistry(tiny_domain, root=tmp_path / tiny_domain)
    promote(registry, model_dirs["v1"], "v1")
    server = start_server(tmp_path)
    texts = test_texts[:16]
    v1_labels = {
        t: TINY_LABELS[int(i)]
        for t, i in zip(texts, expected_predictions(model_dirs["v1"], texts).argmax(dim=1), strict=True)
    }
    headers = {"X-API-Key": KEY}

    async def load_while(action: Callable[[], None], until_version: int) -> list[tuple[int, int, dict]]:
        """Four clients send requests back to back while ``action`` runs in a thread; they go on
        until every client has seen ``until_version`` answer."""
        seen: list[tuple[int, int, dict]] = []  # (client, status, body)
        switched = [False] * 4

        async def client_loop(n: int, client: httpx.AsyncClient) -> None:
            i = n
            while not switched[n]:
                text = texts[i % len(texts)]
                response = await client.post(f"/v1/{tiny_domain}/predict", json={"texts": [text]})
                body = response.json()
                seen.append((n, response.status_code, {**body, "text": text}))
                switched[n] = response.status_code == 200 and body["version"] == until_version
                i += 4

        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as client:
            loops = asyncio.gather(*(client_loop(n, client) for n in range(4)))
            # traffic first (every client answered by v1 at least once), then the promotion lands in the middle of it
            await until(
                lambda: {c for c, status, body in seen if status == 200 and body["version"] == 1} == set(range(4)),
                "each client to be answered by v1 before the promotion",
            )
            await asyncio.to_thread(action)
            await asyncio.wait_for(loops, timeout=180)
        return seen

    seen = asyncio.run(load_while(lambda: promote(registry, model_dirs["v2"], "v2"), until_version=2))
    assert all(status == 200 for _, status, _ in seen), [s for s in seen if s[1] != 200][:3]
    versions = [body["version"] for _, _, body in seen]
    assert versions.count(1) >= 4 and versions.count(2) >= 4
    for n in range(4):  # per client, requests are sequential: once on v2, never back on v1
        own = [body["version"] for c, _, body in seen if c == n]
        assert own == sorted(own), own
    for _, _, body in seen:
        (prediction,) = body["predictions"]
        if body["version"] == 1:
            assert prediction["label"] == v1_labels[body["text"]]
        else:
            assert prediction["label"] == FAVOURED and prediction["score"] > 0.99 and prediction["action"] == "reply"

    with httpx.Client(base_url=server.url, headers=headers) as client:

        def status() -> dict:
            return client.get("/v1/domains").json()["domains"][0]

        assert (status()["version"], status()["champion_version"], status()["status"]) == (2, 2, "serving")
        assert metric_value(client.get("/metrics").text, "domainflow_model_version", domain=tiny_domain) == 2.0

        # A champion that cannot be loaded: the service keeps answering with v2 and says why.
        promote(registry, model_dirs["broken"], "broken")
        failed = wait_for(lambda: (s := status())["last_error"] and s, "the failed load of v3")
        assert (failed["status"], failed["version"], failed["champion_version"]) == ("serving_previous", 2, 3)
        assert "v3" in failed["last_error"]
        answer = client.post(f"/v1/{tiny_domain}/predict", json={"texts": texts[:3]})
        assert answer.status_code == 200 and answer.json()["version"] == 2
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "domainflow_model_loads_total", domain=tiny_domain, outcome="failed") == 1.0
        assert metric_value(metrics, "domainflow_model_version", domain=tiny_domain) == 2.0

        # Rolling the pointer back to v2 clears the error without reloading anything.
        registry.rollback(2, reason="v3 does not load")
        recovered = wait_for(lambda: (s := status())["champion_version"] == 2 and s, "the rollback to be seen")
        assert (recovered["status"], recovered["version"], recovered["last_error"]) == ("serving", 2, None)
        assert (
            metric_value(
                client.get("/metrics").text, "domainflow_model_loads_total", domain=tiny_domain, outcome="loaded"
            )
            == 2.0
        )


def test_a_domain_without_champion_is_503_until_one_is_promoted(
    start_server, tiny_domain: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    server = start_server(tmp_path)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}) as client:
        assert client.get("/readyz").status_code == 503
        waiting = client.post(f"/v1/{tiny_domain}/predict", json={"texts": ["hello"]})
        assert (
            waiting.status_code == 503
            and waiting.headers["retry-after"]
            and "domainflow run" in waiting.json()["detail"]
        )
        # a run whose gate refused its challenger: the 503 says so (the watcher re-reads the decisions it sees change)
        registry = ModelRegistry(tiny_domain, root=tmp_path / tiny_domain)
        registry.record_decision({"promote": False, "chosen": "finetuned", "summary": "below the accuracy gate"})

        def says_why() -> bool:
            detail = client.post(f"/v1/{tiny_domain}/predict", json={"texts": ["hello"]}).json()["detail"]
            return "promoted nothing" in detail and detail.endswith("below the accuracy gate)")

        wait_for(says_why, "the 503 to quote the refused decision")
        promote(registry, model_dirs["v2"], "v2")
        wait_for(lambda: client.get("/readyz").status_code == 200, "the first champion to load")
        answer = client.post(f"/v1/{tiny_domain}/predict", json={"texts": ["hello"]})
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == FAVOURED


# ------------------------------------------------------------------------------------ the batcher alone


def test_batcher_merges_splits_at_the_limit_and_survives_a_failure() -> None:
    calls: list[list[str]] = []

    def run(texts: list[str]) -> tuple[str, list[str]]:
        calls.append(list(texts))
        if "boom" in texts:
            raise ValueError("model exploded")
        return f"call{len(calls)}", [t.upper() for t in texts]

    async def scenario() -> None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run, pool, max_batch_texts=4, max_wait_ms=50, max_queued_texts=8)
            results = await asyncio.gather(*(batcher.submit(texts) for texts in (["a"], ["b", "c"], ["d", "e"], ["f"])))
            # ["d", "e"] does not fit after 3 texts: it heads the next call, in arrival order.
            assert calls == [["a", "b", "c"], ["d", "e", "f"]]
            assert [r[1] for r in results] == [["A"], ["B", "C"], ["D", "E"], ["F"]]
            assert [r[0] for r in results] == ["call1", "call1", "call2", "call2"]

            # A request larger than the limit is sent alone, never split.
            meta, big = await batcher.submit(list("ghijkl"))
            assert big == list("GHIJKL") and calls[-1] == list("ghijkl")

            # A failing batch fails its requests only; the next batch works.
            outcome = await asyncio.gather(batcher.submit(["boom"]), batcher.submit(["x"]), return_exceptions=True)
            assert all(isinstance(o, ValueError) for o in outcome)
            assert (await batcher.submit(["y"]))[1] == ["Y"]

            await batcher.stop()
            assert batcher.batches >= 5

    asyncio.run(scenario())


def test_batcher_admits_by_texts_and_drops_expired_and_withdrawn_work() -> None:
    """The budget counts texts, not requests; a request past its deadline or withdrawn by its caller is
    taken out of the queue (its texts free the budget) and never reaches the model; one in a model call
    is answered whatever the clock says."""
    calls: list[list[str]] = []
    release = threading.Event()

    async def scenario() -> None:
        from concurrent.futures import ThreadPoolExecutor

        loop = asyncio.get_running_loop()
        entered = asyncio.Event()

        def run(texts: list[str]) -> tuple[str, list[str]]:
            calls.append(list(texts))
            loop.call_soon_threadsafe(entered.set)
            release.wait(60)  # the first call holds the model until the queue has been exercised
            return "meta", [t.upper() for t in texts]

        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run, pool, max_batch_texts=4, max_wait_ms=0, max_queued_texts=5, deadline_ms=60_000)
            running = asyncio.ensure_future(batcher.submit(["a"]))
            await entered.wait()  # "a" is in the model call; what follows waits in the queue
            first = batcher.enqueue(["b", "c", "d"])
            gone = batcher.enqueue(["e", "f"])
            assert (batcher.queued, batcher.queued_texts) == (2, 5)
            with pytest.raises(QueueFullError, match="5 texts already waiting"):
                batcher.enqueue(["g"])  # two requests only, but six texts
            assert batcher.withdraw(gone) and gone.future.cancelled() and batcher.queued_texts == 3
            second = batcher.enqueue(["g"])

            batcher.deadline = 0.05  # for the next request only: the others keep the deadline they were queued with
            late = batcher.enqueue(["late"])
            batcher.deadline = 60.0
            with pytest.raises(DeadlineExceededError, match="still queued"):
                await late.future
            assert batcher.queued_texts == 4

            cancelled = asyncio.ensure_future(batcher.submit(["h"]))  # a caller cancelled while queued
            await until(lambda: batcher.queued_texts == 5, "the cancelled caller's text to be queued")
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            assert batcher.queued_texts == 4

            release.set()
            assert (await running)[1] == ["A"]
            assert (await first.future)[1] == ["B", "C", "D"] and (await second.future)[1] == ["G"]
            await batcher.stop()
        assert calls == [["a"], ["b", "c", "d", "g"]]  # e, f, late and h never reached the model

    try:
        asyncio.run(scenario())
    finally:
        release.set()


class GatedModel:
    """Wraps a batcher's model call: records what reaches the model, and holds the first call until released."""

    def __init__(self, batch_function: Callable[[list[Any]], Any], label: str, order: list[str]) -> None:
        self.batch_function, self.label, self.order = batch_function, label, order
        self.entered, self.release = threading.Event(), threading.Event()
        self.inputs: list[Any] = []

    def __call__(self, items: list[Any]) -> Any:
        self.inputs.extend(items)
        self.order.append(self.label)
        self.entered.set()
        self.release.wait(120)
        return self.batch_function(items)


async def until(condition: Callable[[], Any], what: str) -> None:
    """Wait in the event loop until ``condition()`` holds (the timeout only turns a hang into a failure)."""
    async with asyncio.timeout(120):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


def test_overload_is_shed_at_once_with_503_by_reason_and_shed_work_never_reaches_the_model(
    start_server, tiny_domain: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """While the model is busy: a request over the budget of queued texts is refused at once; one whose
    deadline passes in the queue is answered 503 (not run late); one whose client disconnects is dropped.
    None of them reaches the model; what was admitted is answered when the model frees up."""
    promote(ModelRegistry(tiny_domain, root=tmp_path / tiny_domain), model_dirs["v1"], "v1")
    server = start_server(tmp_path, max_texts=8, max_queued_texts=10, request_deadline_ms=60_000, max_wait_ms=0)
    batcher = server.app.state.batchers[tiny_domain]
    gate = GatedModel(batcher.run_batch, "predict", [])
    batcher.run_batch = gate
    path = f"/v1/{tiny_domain}/predict"
    admitted = [f"queued text {i}" for i in range(8)]

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers={"X-API-Key": KEY}, timeout=120) as client:
            blocker = asyncio.ensure_future(client.post(path, json={"texts": ["blocker"]}))
            await asyncio.to_thread(gate.entered.wait, 120)
            queued = asyncio.ensure_future(client.post(path, json={"texts": admitted}))
            await until(lambda: batcher.queued_texts == 8, "8 texts queued")

            full = await client.post(path, json={"texts": ["one", "two", "three"]})  # 11 > 10 texts
            assert full.status_code == 503 and full.headers["retry-after"] == "1", full.text
            assert "texts already waiting" in full.json()["detail"]

            # A client that sends its request and leaves before its batch: its text is withdrawn.
            body = json.dumps({"texts": ["client gone"]}).encode()
            raw = socket.create_connection(("127.0.0.1", server.port))
            raw.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await until(lambda: batcher.queued_texts == 9, "the departing client's text to be queued")
            raw.close()
            await until(lambda: batcher.queued_texts == 8, "the departed client's text to be withdrawn")

            batcher.deadline = 0.05  # this request's deadline passes while the model is still busy
            late = await client.post(path, json={"texts": ["too late"]})
            batcher.deadline = 60.0
            assert late.status_code == 503 and late.headers["retry-after"] == "1", late.text
            assert "deadline" in late.json()["detail"]
            assert batcher.queued_texts == 8

            gate.release.set()
            first, rest = await blocker, await queued
            assert first.status_code == 200 and rest.status_code == 200, (first.text, rest.text)
            assert len(rest.json()["predictions"]) == 8
            metrics = (await client.get("/metrics")).text
        assert gate.inputs == ["blocker", *admitted]  # nothing shed ever reached the model
        for reason in ("queue_full", "deadline", "client_gone"):
            assert metric_value(metrics, "domainflow_rejected_requests_total", domain=tiny_domain, reason=reason) == 1
        assert metric_value(metrics, "domainflow_requests_total", endpoint="/v1/{domain}/predict", status="503") == 2
        # the departed client's answer is a 499 (nobody reads it), not a refusal
        assert metric_value(metrics, "domainflow_requests_total", endpoint="/v1/{domain}/predict", status="499") == 1

    try:
        asyncio.run(scenario())
    finally:
        gate.release.set()


class GatedRecommender:
    """A stand-in ranking champion: records each call, and holds the first one until released."""

    def __init__(self, order: list[str]) -> None:
        self.order = order
        self.entered, self.release = threading.Event(), threading.Event()

    def recommend(self, history: Any, texts: Any, candidates: Any, k: int) -> list[Any]:
        from domainflow.recsys.bundle import Recommendation

        self.order.append("rank")
        self.entered.set()
        self.release.wait(120)
        return [Recommendation("m1", "A film", 1.0)]

    def scorer_for(self, history: Any) -> str:
        return "ranker"


def test_a_rank_flood_is_bounded_and_does_not_starve_predict_of_another_domain(
    start_server, tiny_domain: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Rankings go through the same admission (a bounded queue, 503 beyond it) and take turns with the other
    domains on the single inference thread: a /predict queued behind a flood runs right after the ranking
    in progress, not after the whole flood."""
    from serving.model_store import ServedModel

    promote(ModelRegistry(tiny_domain, root=tmp_path / tiny_domain), model_dirs["v1"], "v1")
    server = start_server(
        tmp_path, domains=(tiny_domain, "recommendation"), max_texts=8, max_queued_texts=8, request_deadline_ms=60_000
    )
    order: list[str] = []
    recommender = GatedRecommender(order)
    slot = server.app.state.store.slots["recommendation"]
    slot.current = ServedModel("recommendation", 7, "stand-in", tmp_path, recommender, "now")
    ranker, batcher = server.app.state.batchers["recommendation"], server.app.state.batchers[tiny_domain]
    predict_gate = GatedModel(batcher.run_batch, "predict", order)
    predict_gate.release.set()  # recorded, never held
    batcher.run_batch = predict_gate

    async def scenario() -> None:
        async with httpx.AsyncClient(
            base_url=server.url, headers={"X-API-Key": KEY}, timeout=120, limits=httpx.Limits(max_connections=32)
        ) as client:

            def rank() -> asyncio.Future[httpx.Response]:
                return asyncio.ensure_future(client.post("/v1/recommendation/rank", json={"history": ["m0"]}))

            first = rank()
            await asyncio.to_thread(recommender.entered.wait, 120)
            flood = [rank() for _ in range(12)]
            await until(lambda: sum(f.done() for f in flood) == 4 and ranker.queued == 8, "8 queued, 4 refused")
            shed = [f for f in flood if f.done()]
            assert all(f.result().status_code == 503 and f.result().headers["retry-after"] == "1" for f in shed)

            predicted = asyncio.ensure_future(client.post(f"/v1/{tiny_domain}/predict", json={"texts": ["hello"]}))
            await until(lambda: batcher.in_flight == 1, "the predict batch to wait for the inference thread")
            recommender.release.set()
            answer = await predicted
            assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
            ranked = [await first] + [await f for f in flood if f not in shed]
            metrics = (await client.get("/metrics")).text
        assert [r.status_code for r in ranked] == [200] * 9
        assert ranked[0].json()["items"][0]["item_id"] == "m1" and ranked[0].json()["version"] == 7
        assert order == ["rank", "predict"] + ["rank"] * 8  # predict ran after one ranking, not after nine
        assert (
            metric_value(metrics, "domainflow_rejected_requests_total", domain="recommendation", reason="queue_full")
            == 4
        )

    try:
        asyncio.run(scenario())
    finally:
        recommender.release.set()


def test_a_chunked_body_over_the_limit_is_refused_as_it_streams(served: ThreadedUvicorn, tiny_domain: str) -> None:
    """No Content-Length (chunked transfer): the bytes are counted as they arrive, and crossing the limit is a
    413, not a body buffered whole and then parsed. A chunked body within the limit is served as usual."""
    produced = 0

    def huge() -> Iterator[bytes]:
        nonlocal produced
        yield b'{"texts": ["'
        for _ in range(500):  # 2 MB, a hundred times the limit of this app (8 texts of 300 characters)
            produced += 1
            yield b"x" * 4096

    def small() -> Iterator[bytes]:
        yield b'{"texts": ["where is '
        yield b'my card?"], "top_k": 2}'

    with httpx.Client(base_url=served.url, headers={"X-API-Key": KEY, "content-type": "application/json"}) as client:
        refused = client.post(f"/v1/{tiny_domain}/predict", content=huge())
        assert refused.status_code == 413 and "request body over" in refused.json()["detail"], refused.text
        fine = client.post(f"/v1/{tiny_domain}/predict", content=small())
        assert fine.status_code == 200 and len(fine.json()["predictions"]) == 1, fine.text


def test_readiness_is_per_domain_and_a_broken_domain_does_not_fail_the_service(
    start_server, tiny_domain: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """One domain serving and one whose champion cannot load: the service is ready (it answers the first),
    ``/readyz/{domain}`` tells each apart, and names and statuses are only given with a key."""
    promote(ModelRegistry(tiny_domain, root=tmp_path / tiny_domain), model_dirs["v1"], "v1")
    promote(ModelRegistry("recommendation", root=tmp_path / "recommendation"), model_dirs["broken"], "broken")
    server = start_server(tmp_path, domains=(tiny_domain, "recommendation"))
    with httpx.Client(base_url=server.url) as client:
        keyed = {"X-API-Key": KEY}
        overall = client.get("/readyz")
        assert overall.status_code == 200 and overall.json() == {"ready": True}
        assert client.get("/readyz", headers=keyed).json() == {
            "ready": True,
            "domains": {tiny_domain: "serving", "recommendation": "load_failed"},
        }
        healthy = client.get(f"/readyz/{tiny_domain}")
        assert healthy.status_code == 200 and healthy.json() == {"ready": True}
        assert client.get(f"/readyz/{tiny_domain}", headers=keyed).json() == {
            "ready": True,
            "status": "serving",
            "version": 1,
        }
        broken = client.get("/readyz/recommendation")
        assert broken.status_code == 503 and broken.json() == {"ready": False}
        assert client.get("/readyz/recommendation", headers=keyed).json() == {
            "ready": False,
            "status": "load_failed",
            "version": None,
        }
        unknown = client.get("/readyz/no_such_domain")
        assert unknown.status_code == 404 and unknown.json() == {"ready": False}
        answer = client.post(f"/v1/{tiny_domain}/predict", json={"texts": ["hello"]}, headers=keyed)
        assert answer.status_code == 200, answer.text


# ------------------------------------------------------------------------------------ `domainflow serve` end to end


def test_serve_command_needs_a_key() -> None:
    from flows.ops_cli import ops_app

    result = CliRunner().invoke(
        ops_app, ["serve", "--port", "1"], env={"DOMAINFLOW_API_KEYS": "", "DOMAINFLOW_API_KEYS_FILE": None}
    )
    assert result.exit_code == 2
    assert "no API key configured" in result.output


def test_serve_command_serves_customer_service(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`domainflow serve` as a user runs it: a process, a home with a champion, a key, curl-like calls."""
    home = tmp_path / "home"
    labels = list(get_domain("customer_service").label_names)
    model_dir = make_classifier_dir(tiny_model_dir, tmp_path / "model", labels, seed=3, favour="card_arrival")
    promote(ModelRegistry("customer_service", root=home / "registry" / "customer_service"), model_dir, "tiny")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DOMAINFLOW_"))}
    env.update(DOMAINFLOW_HOME=str(home), DOMAINFLOW_API_KEYS=KEY)
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.ops_cli", "serve", "customer_service", "--port", str(port)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"serve exited with {process.returncode}: {process.stdout.read()}")
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, "`serve` to become ready", timeout=180, interval=0.3)
        answer = httpx.post(
            f"{url}/v1/customer_service/predict",
            json={"texts": ["My card has not arrived yet"]},
            headers={"X-API-Key": KEY},
        )
        assert answer.status_code == 200, answer.text
        (prediction,) = answer.json()["predictions"]
        assert prediction["label"] == "card_arrival" and prediction["action"] == "reply"
        assert prediction["reply"] == REPLY_TEMPLATES["card_arrival"]
        assert httpx.post(f"{url}/v1/customer_service/predict", json={"texts": ["x"]}).status_code == 401
        assert httpx.get(f"{url}/openapi.json").status_code == 401
        openapi = httpx.get(f"{url}/openapi.json", headers={"X-API-Key": KEY}).json()
        assert "/v1/{domain}/predict" in openapi["paths"] and "APIKeyHeader" in json.dumps(openapi["components"])
    finally:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output
    assert "Application shutdown complete" in output


def test_domains_are_served_by_task_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Text classification behind /predict (micro-batched), ranking behind /rank; other kinds are refused."""
    from domainflow import catalog
    from tests.data_helpers import replace

    keys = ApiKeys([KEY])
    default = create_app(ServingConfig(registry_root=tmp_path), api_keys=keys)
    served_domains = set(default.state.store.slots)
    assert {"customer_service", "recommendation"} <= served_domains
    assert {get_domain(name).task_kind for name in served_domains} == {"text_classification", "ranking"}
    # Both kinds go through the admission control; a ranking is one request per model call.
    assert default.state.batchers["recommendation"].max_batch_texts == 1
    assert default.state.batchers["customer_service"].max_batch_texts == 64
    summaries = replace(get_domain("customer_service"), name="cs_summaries", task_kind="summarization")
    monkeypatch.setitem(catalog._registered, "cs_summaries", catalog.Entry(summaries, "module"))
    with pytest.raises(ValueError, match="cannot serve cs_summaries"):
        create_app(ServingConfig(registry_root=tmp_path, domains=("customer_service", "cs_summaries")), api_keys=keys)
    with pytest.raises(ValueError, match="unknown domain 'nope'"):
        create_app(ServingConfig(registry_root=tmp_path, domains=("nope",)), api_keys=keys)


def test_a_domain_with_a_retrieval_fallback_returns_the_nearest_question(tiny_domain: str) -> None:
    """An unsure prediction with a close known question is answered from it; without one it is escalated
    with the question as a hint; a confident one ignores retrieval. Extra keys of a response go to ``details``."""
    from domainflow.retrieval import Nearest
    from serving.inference import TextScores, prediction_record
    from serving.schemas import Prediction
    from tests.data_helpers import replace

    base = get_domain(tiny_domain)
    unsure = (("card_arrival", "pin_blocked"), (0.3, 0.2))
    close = Nearest("my card still hasn't come", "card_arrival", 0.93, close_enough=True)
    far = Nearest("how do I change my PIN", "pin_blocked", 0.41, close_enough=False)

    retrieved = Prediction.model_validate(
        prediction_record(base, "where is my card", TextScores(*unsure, close), top_k=1)
    )
    assert retrieved.action == "reply_from_similar_question" and retrieved.reply == REPLY_TEMPLATES["card_arrival"]
    assert (
        retrieved.nearest_question.question == "my card still hasn't come"
        and retrieved.nearest_question.similarity == 0.93
    )

    escalated = Prediction.model_validate(prediction_record(base, "hmm", TextScores(*unsure, far), top_k=1))
    assert (
        escalated.action == "escalate"
        and escalated.reply == ESCALATION_REPLY
        and escalated.nearest_question.close_enough is False
    )

    confident = Prediction.model_validate(
        prediction_record(base, "where is my card", TextScores(("card_arrival", "pin_blocked"), (0.9, 0.1)), top_k=2)
    )
    assert (
        confident.action == "reply"
        and confident.nearest_question is None
        and [p.label for p in confident.top_k] == ["card_arrival", "pin_blocked"]
    )

    class WithTicketQueue(type(base)):  # type: ignore[misc]
        def respond(self, label: str, score: float, nearest: Nearest | None = None) -> dict[str, Any]:
            return {**super().respond(label, score, nearest), "ticket_queue": "cards"}

    spec = WithTicketQueue.model_validate(dict(base))
    record = Prediction.model_validate(prediction_record(spec, "where is my card", TextScores(*unsure, far), top_k=1))
    assert record.details == {"ticket_queue": "cards"} and record.action == "escalate"
    assert (
        Prediction.model_validate(prediction_record(replace(base), "x", TextScores(*unsure), top_k=2)).nearest_question
        is None
    )
