"""The FastAPI application: each domain's champion behind ``POST /v1/{domain}/predict`` (text
classification) or ``POST /v1/{domain}/rank`` (ranking, see :mod:`serving.ranking`).

``create_app`` wires the parts, each in its own module: API keys (:mod:`serving.auth`), limits
(:mod:`serving.config`, :mod:`serving.schemas`), micro-batching (:mod:`serving.batching`), the
champion watcher and hot swap (:mod:`serving.model_store`), Prometheus metrics
(:mod:`serving.metrics`). It reads no global state beyond what it is given: the registry root,
the domains and the keys come in as arguments, so tests and benchmarks can run several apps.

Status codes: 401 no or wrong key; 404 unknown domain; 413 body too large; 422 invalid body
(the message names the field and the problem); 503 no model loaded yet, or backlog full, with
``Retry-After``. A 500 means a bug or a broken model, never bad input.

(No ``from __future__ import annotations`` here: FastAPI must see the request model built at
run time in ``create_app`` as a real annotation.)
"""

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from domainflow.catalog import get_domain, list_domains
from domainflow.kinds import KINDS, kind_of, resolve
from domainflow.recsys.bundle import UnknownItemsError
from domainflow.registry import VersionInfo
from domainflow.spec import ClassificationSpec, DomainSpec
from serving.auth import OPERATIONAL_PATHS, ApiKeyMiddleware, ApiKeys, operational_key, require_api_key
from serving.batching import BatcherClosedError, MicroBatcher, QueueFullError
from serving.config import ServingConfig
from serving.inference import NoModelError, batch_function, prediction_record
from serving.metrics import MetricsMiddleware, ServingMetrics
from serving.model_store import DomainSlot, ModelStore, ServedModel
from serving.ranking import RankResponse, rank, rank_request_model, unknown_items_detail
from serving.schemas import DomainsResponse, DomainStatus, PredictResponse, request_model

log = logging.getLogger("domainflow.serving")


def _load_champion(slot: DomainSlot, info: VersionInfo) -> ServedModel:
    """A classifier or a recommender: the loader the domain's task kind names (``domainflow.kinds``)."""
    return resolve(kind_of(slot.spec).serving_loader)(slot, info)


def _endpoint(spec: Any) -> str:
    return kind_of(spec).endpoint


class BodySizeLimit:
    """413 before parsing a body larger than any valid request could be (a declared length only:
    the JSON limits still bound a chunked body once parsed)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", ()):
                if name == b"content-length":
                    try:
                        too_large = int(value) > self.max_bytes
                    except ValueError:
                        too_large = False
                    if too_large:
                        response = JSONResponse(
                            {"detail": f"request body over {self.max_bytes} bytes; send fewer or shorter texts"},
                            status_code=413,
                        )
                        await response(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)


def _validation_message(errors: list[dict]) -> str:
    parts = []
    for error in errors[:5]:
        loc = [p for p in error.get("loc", ()) if p != "body"]
        if error.get("type") == "json_invalid":
            parts.append(f"body is not valid JSON (at character {loc[0]})" if loc else "body is not valid JSON")
            continue
        where = ".".join(str(p) for p in loc) or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid').removeprefix('Value error, ')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with a one-line message plus the details, without echoing the input back (it can be
    64 texts of 2000 characters)."""
    errors = [{k: v for k, v in error.items() if k in ("type", "loc", "msg")} for error in exc.errors()]
    return JSONResponse(
        {"message": _validation_message(errors), "detail": errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT
    )


def _declared_labels(spec: DomainSpec) -> int:
    """How many labels a domain declares (0 for a kind without labels, such as ranking)."""
    return spec.num_labels if isinstance(spec, ClassificationSpec) else 0


def _domain_status(slot: DomainSlot) -> DomainStatus:
    current = slot.current
    return DomainStatus(
        domain=slot.domain,
        description=slot.spec.description,
        status=slot.status,
        version=current.version if current else None,
        champion_version=slot.champion_version,
        candidate=current.candidate if current else None,
        loaded_at=current.loaded_at if current else None,
        labels=len(current.label_names) if current else _declared_labels(slot.spec),
        last_error=slot.last_error,
    )


def create_app(config: ServingConfig | None = None, *, api_keys: ApiKeys | None = None) -> FastAPI:
    """Build the service for ``config.domains`` (default: every registered servable domain) of ``config.registry_root``.

    ``api_keys`` defaults to :meth:`ApiKeys.from_environment`, which raises when none is set:
    the service never starts open by accident.
    """
    config = config or ServingConfig()
    keys = api_keys if api_keys is not None else ApiKeys.from_environment()
    try:
        if config.domains:
            specs = {spec.name: spec for spec in map(get_domain, config.domains)}  # a name or a domain file
        else:  # every registered domain of a kind this service knows how to serve
            specs = {name: spec for name in list_domains() if (spec := get_domain(name)).task_kind in KINDS}
    except KeyError as exc:
        raise ValueError(str(exc).strip("'\"")) from None
    other = sorted(name for name, spec in specs.items() if spec.task_kind not in KINDS)
    if other:
        raise ValueError(f"cannot serve {', '.join(other)}: only {', '.join(KINDS)} domains are served")
    if not specs:
        raise ValueError("no servable domain is registered")
    names = tuple(specs)

    metrics = ServingMetrics(names)

    def on_load(slot: DomainSlot, succeeded: bool) -> None:
        metrics.model_loads.labels(slot.domain, "loaded" if succeeded else "failed").inc()
        metrics.model_version.labels(slot.domain).set(slot.current.version if slot.current else 0)

    store = ModelStore.for_domains(
        specs,
        config.registry_root,
        poll_seconds=config.poll_seconds,
        retry_failed_load_seconds=config.retry_failed_load_seconds,
        on_load=on_load,
        loader=_load_champion,
    )
    # One inference thread for all domains: two model calls at once on a small CPU only slow each other.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="domainflow-inference")
    batchers: dict[str, MicroBatcher] = {}
    for name, slot in store.slots.items():
        if _endpoint(slot.spec) != "predict":
            continue
        batchers[name] = MicroBatcher(
            batch_function(slot, config.max_top_k),
            executor,
            max_batch_texts=config.max_batch_texts,
            max_wait_ms=config.max_wait_ms,
            max_queued_requests=config.max_queued_requests,
            on_batch=metrics.batch_size.labels(name).observe,
            name=f"batcher-{name}",
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await store.refresh()  # champions load before the server accepts connections
        for batcher in batchers.values():
            batcher.start()
        store.start_watching()
        try:
            yield
        finally:
            await store.stop_watching()
            for batcher in batchers.values():
                await batcher.stop()  # in-flight requests are answered first
            executor.shutdown(wait=True)

    app = FastAPI(
        title="domainflow",
        summary="Each domain's champion model, micro-batched, hot-swapped on promotion.",
        version="1",
        lifespan=lifespan,
    )
    app.state.config, app.state.store, app.state.batchers, app.state.metrics = config, store, batchers, metrics
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    # add_middleware puts each new one outside the previous: metrics → key check → body size → routes.
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(
        ApiKeyMiddleware,
        keys=keys,
        protected_prefix="/v1/",
        protected_paths=OPERATIONAL_PATHS if config.protect_operational else (),
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics, router=app.router)

    authenticated = [Depends(require_api_key(keys))]
    PredictRequest = request_model(config)
    RankRequest = rank_request_model(config)

    def _served_slot(domain: str, endpoint: str) -> DomainSlot:
        """The domain's slot with a model loaded: 404 when it is not served at this endpoint, 503 when it has
        no model yet."""
        slot = store.slots.get(domain)
        if slot is None or _endpoint(slot.spec) != endpoint:
            served = ", ".join(name for name, s in store.slots.items() if _endpoint(s.spec) == endpoint) or "none"
            hint = (
                f"; {domain} is a {slot.spec.task_kind} domain: use /v1/{domain}/{_endpoint(slot.spec)}" if slot else ""
            )
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"unknown domain {domain!r} for this endpoint; served: {served}{hint}"
            )
        if slot.current is None:
            reason = slot.last_error or f"no champion yet: run `domainflow run {domain}`"
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"{domain} has no model loaded ({reason})",
                headers={"Retry-After": "5"},
            )
        return slot

    errors: dict[int | str, dict[str, Any]] = {
        401: {"description": "Missing or invalid API key"},
        404: {"description": "Unknown domain"},
        413: {"description": "Body too large"},
        422: {"description": "Invalid body: the message names the field and the problem"},
        503: {"description": "No model loaded for the domain yet, or too many requests waiting (see Retry-After)"},
    }

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """The process is up (no key needed)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz(request: Request) -> JSONResponse:
        """Ready when at least one domain is served and every domain with a champion has a model loaded.

        Open, since an orchestrator's probe carries no key; the per-domain statuses (names, what is served)
        are added only for a caller with a valid key, unless the operational endpoints are open."""
        statuses = {name: slot.status for name, slot in store.slots.items()}
        waiting = [
            name for name, slot in store.slots.items() if slot.champion_version is not None and slot.current is None
        ]
        ready = any(slot.current is not None for slot in store.slots.values()) and not waiting
        detailed = not config.protect_operational or keys.accepts(operational_key(request.scope["headers"]))
        body: dict[str, Any] = {"ready": ready, "domains": statuses} if detailed else {"ready": ready}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"])
    async def prometheus_metrics() -> Response:
        """Prometheus text format: requests, latency, errors, batch sizes, model versions (key needed unless the
        operational endpoints are open: scrape with ``basic_auth`` or a bearer credentials file)."""
        for name, batcher in batchers.items():
            metrics.queue_depth.labels(name).set(batcher.queued)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get(
        "/v1/domains",
        response_model=DomainsResponse,
        dependencies=authenticated,
        tags=["predict"],
        responses={401: errors[401]},
    )
    async def served_domains() -> DomainsResponse:
        """What is served, which version, and the last load error if any."""
        return DomainsResponse(domains=[_domain_status(slot) for slot in store.slots.values()])

    @app.post(
        "/v1/{domain}/predict",
        response_model=PredictResponse,
        dependencies=authenticated,
        tags=["predict"],
        responses=errors,
    )
    async def predict(domain: str, body: PredictRequest) -> JSONResponse:  # type: ignore[valid-type]
        """Label, score and top-k labels per text, plus what the domain does with it (customer_service:
        the reply, or an escalation under its confidence threshold)."""
        slot = _served_slot(domain, "predict")
        texts: list[str] = body.texts  # type: ignore[attr-defined]
        try:
            served, scores = await batchers[domain].submit(texts)
        except (QueueFullError, BatcherClosedError) as exc:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, f"{domain}: {exc}; retry shortly", headers={"Retry-After": "1"}
            ) from None
        except NoModelError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc), headers={"Retry-After": "5"}) from None
        except Exception as exc:
            metrics.errors.labels("/v1/{domain}/predict", domain, "inference").inc()
            log.exception("%s: inference failed", domain)
            raise HTTPException(
                status.HTTP_500_INTERNAL_SERVER_ERROR, f"inference failed: {type(exc).__name__}"
            ) from None
        top_k: int = body.top_k  # type: ignore[attr-defined]
        spec = slot.spec.as_kind(ClassificationSpec)
        predictions = [prediction_record(spec, text, row, top_k) for text, row in zip(texts, scores, strict=True)]
        metrics.texts.labels(domain).inc(len(texts))
        return JSONResponse({"domain": domain, "version": served.version, "predictions": predictions})

    @app.post(
        "/v1/{domain}/rank", response_model=RankResponse, dependencies=authenticated, tags=["rank"], responses=errors
    )
    async def rank_items(domain: str, body: RankRequest) -> JSONResponse:  # type: ignore[valid-type]
        """The top-k catalogue items for a history of item ids and/or free texts (ranking domains: recommendation)."""
        served = _served_slot(domain, "rank").current
        try:
            answer = await rank(served, body, executor)
        except UnknownItemsError as exc:
            return JSONResponse(unknown_items_detail(exc), status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
        except Exception as exc:
            metrics.errors.labels("/v1/{domain}/rank", domain, "inference").inc()
            log.exception("%s: ranking failed", domain)
            raise HTTPException(
                status.HTTP_500_INTERNAL_SERVER_ERROR, f"ranking failed: {type(exc).__name__}"
            ) from None
        return JSONResponse(answer)

    return app
