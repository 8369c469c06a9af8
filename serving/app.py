"""The FastAPI application: each domain's champion behind ``POST /v1/{domain}/predict`` (text
classification; ``POST /v1/{domain}/explain`` says why, word by word: :mod:`domainflow.explain`) or
``POST /v1/{domain}/rank`` (ranking, see :mod:`serving.ranking`).

``create_app`` wires the parts, each in its own module: API keys (:mod:`serving.auth`), limits
(:mod:`serving.config`, :mod:`serving.schemas`), micro-batching (:mod:`serving.batching`), the
champion watcher and hot swap (:mod:`serving.model_store`), Prometheus metrics
(:mod:`serving.metrics`). It reads no global state beyond what it is given: the registry root,
the domains and the keys come in as arguments, so tests and benchmarks can run several apps.

Status codes: 401 no or wrong key; 404 unknown domain; 413 body too large (declared or as it
streams in); 422 invalid body (the message names the field and the problem); 503 with
``Retry-After``: no model loaded yet, or shed by the admission control (the domain's backlog of
texts is full, or the request's deadline passed while it was queued; counted by reason in
``domainflow_rejected_requests``); 409 from /explain: the method cannot explain the served model
(integrated gradients on an int8 graph). A 500 means a bug or a broken model, never bad input.

(No ``from __future__ import annotations`` here: FastAPI must see the request model built at
run time in ``create_app`` as a real annotation.)
"""

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from domainflow.catalog import get_domain, list_domains
from domainflow.explain import (
    Explanation,
    ExplanationUnavailableError,
    explain_text,
)
from domainflow.kinds import KINDS, kind_of, resolve
from domainflow.pii import PiiRejectedError, protect
from domainflow.recsys.bundle import UnknownItemsError
from domainflow.registry import VersionInfo
from domainflow.spec import ClassificationSpec, DomainSpec
from serving.auth import OPERATIONAL_PATHS, ApiKeyMiddleware, ApiKeys, operational_key, require_api_key
from serving.batching import BatcherClosedError, DeadlineExceededError, MicroBatcher, QueueFullError, Ticket
from serving.config import ServingConfig
from serving.fast_path import PredictFastPath
from serving.inference import NoModelError, batch_function, prediction_record
from serving.metrics import MetricsMiddleware, ServingMetrics
from serving.model_store import DomainSlot, ModelStore, ServedModel
from serving.ranking import RankResponse, rank_function, rank_request_model, unknown_items_detail
from serving.schemas import (
    DomainsResponse,
    DomainStatus,
    ExplainResponse,
    PredictResponse,
    explain_request_model,
    request_model,
)

log = logging.getLogger("domainflow.serving")

CLIENT_CLOSED_REQUEST = 499

#: A batch holding the old model ends within the request deadline (seconds at most); then it can be collected.
REFREEZE_AFTER_SWAP_SECONDS = 30.0


def _load_champion(slot: DomainSlot, info: VersionInfo) -> ServedModel:
    """A classifier or a recommender: the loader the domain's task kind names (``domainflow.kinds``)."""
    return resolve(kind_of(slot.spec).serving_loader)(slot, info)


def _endpoint(spec: Any) -> str:
    return kind_of(spec).endpoint


def _explain_function(slot: DomainSlot) -> Callable[[list[Any]], tuple[ServedModel, list[Explanation | ValueError]]]:
    """What a domain's explainer batcher runs in the inference thread: one explain request per call (its text and
    one-word-deleted variants are one model call already). The model is read from the slot once, as for predict;
    an unknown label or a method that cannot explain this model comes back as the request's answer (a 4xx)."""

    def run(requests: list[Any]) -> tuple[ServedModel, list[Explanation | ValueError]]:
        served = slot.current
        if served is None:
            raise NoModelError(f"no model loaded for {slot.domain}")
        answers: list[Explanation | ValueError] = []
        for request in requests:
            try:
                answers.append(explain_text(served.loaded, request.text, request.method, request.label))
            except ValueError as exc:
                answers.append(exc)
        return served, answers

    return run


def _protected(slot: DomainSlot, texts: list[str]) -> list[str]:
    """A request's texts as the domain's ``pii`` setting lets them through (domainflow/pii.py): masked, or a 422
    naming the text and the kind of personal data found (never the value) under ``reject``."""
    spec = slot.spec.as_kind(ClassificationSpec)
    hint = 'this domain refuses personal data (pii = "reject"): remove it and send the text again'
    try:
        return protect(spec.pii, texts, [f"texts[{i}]" for i in range(len(texts))], slot.domain, hint).texts
    except PiiRejectedError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


def _protected_request(slot: DomainSlot, body: Any) -> Any:
    """An explain request with its text as the domain's ``pii`` setting lets it through (see :func:`_protected`)."""
    return body.model_copy(update={"text": _protected(slot, [body.text])[0]})


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` once a body has grown past the limit; an HTTPException so that FastAPI's
    body reader re-raises it as is (any other exception there becomes a 400)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body over {max_bytes} bytes; send fewer or shorter texts")


class BodySizeLimit:
    """413 for a body larger than any valid request could be, before it is parsed or buffered whole.

    A declared ``Content-Length`` over the limit is refused before a byte is read. A body without
    one (chunked transfer) is counted as it is received: the chunk that crosses the limit ends
    the read with a 413, so a client cannot make the service buffer an unbounded body."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        detail = {"detail": f"request body over {self.max_bytes} bytes; send fewer or shorter texts"}
        await JSONResponse(detail, status_code=413)(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_large = int(value) > self.max_bytes
                except ValueError:
                    too_large = False
                if too_large:
                    await self._refuse(scope, receive, send)
                    return
                break
        received = 0
        started = False

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        async def watching_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLargeError:  # read outside FastAPI's body reader (which answers it itself)
            if started:
                raise
            await self._refuse(scope, receive, send)


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


def _validation_payload(errors: list[dict]) -> dict:
    """A one-line message plus the details (type, location, message), without echoing the input back (it can
    be 64 texts of 2000 characters)."""
    details = [{k: v for k, v in error.items() if k in ("type", "loc", "msg")} for error in errors]
    return {"message": _validation_message(details), "detail": details}


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(_validation_payload(list(exc.errors())), status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


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
    started: list[bool] = []  # non-empty once the service is up (on_load then means a hot swap)

    def on_load(slot: DomainSlot, succeeded: bool) -> None:
        if succeeded and started:  # a hot swap: once batches let go of the old model, collect it, freeze the new
            asyncio.get_running_loop().call_later(REFREEZE_AFTER_SWAP_SECONDS, _freeze_long_lived_objects)
        metrics.model_loads.labels(slot.domain, "loaded" if succeeded else "failed").inc()
        metrics.model_version.labels(slot.domain).set(slot.current.version if slot.current else 0)

    store = ModelStore.for_domains(
        specs,
        config.registry_root,
        poll_seconds=config.poll_seconds,
        retry_failed_load_seconds=config.retry_failed_load_seconds,
        on_load=on_load,
        loader=_load_champion,
        share_base=config.share_base_encoders,
    )
    # One inference thread for all domains: two model calls at once on a small CPU only slow each other.
    # Every domain, /rank ones included, gets a batcher in front of it: the admission control (a bounded
    # queue of texts with deadlines), and at most one call per domain in the executor at a time, which
    # runs them in arrival order, so domains take turns (see serving.batching).
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="domainflow-inference")
    batchers: dict[str, MicroBatcher] = {}
    for name, slot in store.slots.items():
        ranks = _endpoint(slot.spec) == "rank"
        batchers[name] = MicroBatcher(
            rank_function(slot) if ranks else batch_function(slot, config.max_top_k),
            executor,
            max_batch_texts=1 if ranks else config.max_batch_texts,  # one ranking per call: nothing to merge
            max_wait_ms=0.0 if ranks else config.max_wait_ms,
            max_queued_texts=config.max_queued_texts,
            deadline_ms=config.request_deadline_ms,
            on_batch=None if ranks else metrics.batch_size.labels(name).observe,
            name=f"{'ranker' if ranks else 'batcher'}-{name}",
        )
    # /explain: a batcher of one explanation per call for each classifier domain, on the same executor (it takes
    # turns with predict) and with the same admission rules; an explanation counts 1 of its backlog.
    explainers: dict[str, MicroBatcher] = {
        name: MicroBatcher(
            _explain_function(slot),
            executor,
            max_batch_texts=1,
            max_wait_ms=0.0,
            max_queued_texts=config.max_queued_texts,
            deadline_ms=config.request_deadline_ms,
            name=f"explainer-{name}",
        )
        for name, slot in store.slots.items()
        if _endpoint(slot.spec) == "predict"
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await store.refresh()  # champions load before the server accepts connections
        _freeze_long_lived_objects()
        started.append(True)
        for batcher in (*batchers.values(), *explainers.values()):
            batcher.start()
        store.start_watching()
        try:
            yield
        finally:
            await store.stop_watching()
            for batcher in (*batchers.values(), *explainers.values()):
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

    authenticated = [Depends(require_api_key(keys))]
    PredictRequest = request_model(config)
    RankRequest = rank_request_model(config)
    ExplainRequest = explain_request_model(config)

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
            # the watcher keeps the registry's reason; before its first poll (a request racing start-up) ask once
            reason = (
                slot.last_error or f"no champion yet: {slot.no_champion_reason or slot.registry.no_champion_hint()}"
            )
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
        503: {
            "description": "No model loaded for the domain yet, its backlog is full, or the request's deadline "
            "passed while it waited (see Retry-After)"
        },
    }

    def _shed(domain: str, reason: str, message: str) -> HTTPException:
        """A 503 of the admission control, counted by reason (the client is asked to retry shortly).

        A client that left gets 499 instead (nginx's "client closed request"): nobody reads that answer, and
        counted as a 503 it would pass for a refusal that took as long as the client waited."""
        metrics.rejected.labels(domain, reason).inc()
        if reason == "client_gone":
            return HTTPException(CLIENT_CLOSED_REQUEST, f"{domain}: {message}")
        return HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"{domain}: {message}; retry shortly", headers={"Retry-After": "1"}
        )

    def _refuse_if_full(domain: str) -> None:
        """503 now when the domain's batcher would refuse even a one-text request (see serving.fast_path)."""
        batcher = batchers.get(domain)
        if batcher is None:
            return  # an unknown domain: the handler answers 404
        try:
            batcher.check_admission(1)
        except QueueFullError as exc:
            raise _shed(domain, "queue_full", str(exc)) from None

    async def _answer(
        receive: Callable[[], Awaitable[Any]], domain: str, items: list[Any], batcher: MicroBatcher | None = None
    ) -> Any:
        """Queue ``items`` on the domain's batcher (or ``batcher``) and wait for their answer, unless the client
        leaves first.

        Why watch for the disconnect: Starlette does not cancel a handler whose client went away, so
        its texts would still reach the model. The body has been read, so the next ``receive`` returns
        only when the client disconnects; then the request is withdrawn from the queue (never run) or,
        already in a model call, its rows are discarded.
        """
        batcher = batcher or batchers[domain]
        try:
            ticket: Ticket = batcher.enqueue(items)
        except QueueFullError as exc:
            raise _shed(domain, "queue_full", str(exc)) from None
        except BatcherClosedError as exc:
            raise _shed(domain, "shutting_down", str(exc)) from None
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((ticket.future, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler is cancelled (server shutdown)
            gone.cancel()
            if not ticket.future.done():
                batcher.withdraw(ticket)
        if ticket.future.cancelled():
            raise _shed(domain, "client_gone", "the client disconnected before its answer")
        try:
            return ticket.future.result()
        except DeadlineExceededError as exc:
            raise _shed(domain, "deadline", str(exc)) from None
        except BatcherClosedError as exc:
            raise _shed(domain, "shutting_down", str(exc)) from None

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """The process is up (no key needed)."""
        return {"status": "ok"}

    def _detailed(request: Request) -> bool:
        return not config.protect_operational or keys.accepts(operational_key(request.scope["headers"]))

    @app.get("/readyz", tags=["ops"])
    async def readyz(request: Request) -> JSONResponse:
        """Ready (200) when at least one domain has a model loaded; 503 when none has.

        Why not "every domain": a domain whose champion is broken would then make the orchestrator
        take away a service that still answers every other domain. Per-domain readiness is
        ``/readyz/{domain}``; the statuses of all domains are added for a caller with a valid key
        (or to anyone when the operational endpoints are open). Open, since a probe carries no key.
        """
        ready = any(slot.current is not None for slot in store.slots.values())
        body: dict[str, Any] = {"ready": ready}
        if _detailed(request):
            body["domains"] = {name: slot.status for name, slot in store.slots.items()}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/readyz/{domain}", tags=["ops"])
    async def domain_readyz(domain: str, request: Request) -> JSONResponse:
        """Ready (200) when this domain has a model loaded (a previous version serving after a failed load
        counts: it answers), 503 when not, 404 for a domain this service does not serve. Open like
        ``/readyz``; the status and version are added for a caller with a key."""
        slot = store.slots.get(domain)
        if slot is None:
            return JSONResponse({"ready": False}, status_code=404)
        ready = slot.current is not None
        body: dict[str, Any] = {"ready": ready}
        if _detailed(request):
            body.update(status=slot.status, version=slot.current.version if slot.current else None)
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"])
    async def prometheus_metrics() -> Response:
        """Prometheus text format: requests, latency, errors, batch sizes, model versions (key needed unless the
        operational endpoints are open: scrape with ``basic_auth`` or a bearer credentials file)."""
        for name, batcher in batchers.items():
            metrics.queue_depth.labels(name).set(batcher.queued)
            metrics.queued_texts.labels(name).set(batcher.queued_texts)
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
    async def predict(domain: str, body: PredictRequest, request: Request) -> JSONResponse:  # type: ignore[valid-type]
        """Label, score and top-k labels per text, plus what the domain does with it (customer_service:
        the reply, or an escalation under its confidence threshold or when the text is flagged out of scope,
        with ``out_of_scope`` and its score)."""
        # Requests are answered by serving.fast_path with the same handler; this declaration documents the
        # route in OpenAPI and names it in the metrics.
        return JSONResponse(await predict_payload(domain, body, request.receive))

    async def _model_call(call: Awaitable[Any], domain: str, route: str, what: str) -> Any:
        """``call``'s answer: no champion yet is a 503 (retry later), any other failure a 500 that names only the
        exception's type (the traceback goes to the log) and is counted in the route's inference errors."""
        try:
            return await call
        except HTTPException:
            raise
        except NoModelError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc), headers={"Retry-After": "5"}) from None
        except Exception as exc:
            metrics.errors.labels(route, domain, "inference").inc()
            log.exception("%s: %s failed", domain, what)
            raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, f"{what} failed: {type(exc).__name__}") from None

    async def predict_payload(domain: str, body: Any, receive: Callable[[], Awaitable[Any]]) -> dict:
        """The answer to a validated predict request; HTTPException for a 4xx/5xx."""
        slot = _served_slot(domain, "predict")
        texts = _protected(slot, body.texts)  # masked (or refused) before a model, log or metric sees them
        served, scores = await _model_call(_answer(receive, domain, texts), domain, "/v1/{domain}/predict", "inference")
        top_k: int = body.top_k
        spec = slot.spec.as_kind(ClassificationSpec)
        predictions = [prediction_record(spec, text, row, top_k) for text, row in zip(texts, scores, strict=True)]
        metrics.texts.labels(domain).inc(len(texts))
        return {"domain": domain, "version": served.version, "predictions": predictions}

    @app.post(
        "/v1/{domain}/rank", response_model=RankResponse, dependencies=authenticated, tags=["rank"], responses=errors
    )
    async def rank_items(domain: str, body: RankRequest, request: Request) -> JSONResponse:  # type: ignore[valid-type]
        """The top-k catalogue items for a history of item ids and/or free texts (ranking domains: recommendation).

        Through the domain's batcher, like /predict: a ranking counts 1 text of the admission budget (one
        user-tower pass over the rendered history dominates its cost)."""
        _served_slot(domain, "rank")
        try:
            _, (answer,) = await _answer(request.receive, domain, [body])
        except HTTPException:
            raise
        except NoModelError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc), headers={"Retry-After": "5"}) from None
        except Exception as exc:
            metrics.errors.labels("/v1/{domain}/rank", domain, "inference").inc()
            log.exception("%s: ranking failed", domain)
            raise HTTPException(
                status.HTTP_500_INTERNAL_SERVER_ERROR, f"ranking failed: {type(exc).__name__}"
            ) from None
        if isinstance(answer, UnknownItemsError):
            return JSONResponse(unknown_items_detail(answer), status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
        return JSONResponse(answer)

    @app.post(
        "/v1/{domain}/explain",
        response_model=ExplainResponse,
        dependencies=authenticated,
        tags=["predict"],
        responses={
            **errors,
            409: {"description": "The method cannot explain the served model (the message says why)"},
        },
    )
    async def explain(domain: str, body: ExplainRequest, request: Request) -> JSONResponse:  # type: ignore[valid-type]
        """The prediction for one text and one score per word (how much the word raises the label's log-odds): for
        the predicted label and, with ``label``, for another one. ``occlusion`` explains the served model itself
        (int8 included) from one model call; ``integrated_gradients`` needs a champion with fp32 torch weights
        (409 otherwise). Same key, limits and admission control as /predict."""
        slot = _served_slot(domain, "predict")
        body = _protected_request(slot, body)  # personal data masked (or refused) as for predict
        # An unknown label or a method the model cannot serve is found by the explainer on the inference thread
        # (never on the event loop: integrated gradients' check imports captum, ~0.5 s) and answered below.
        answered_by, (answer,) = await _model_call(
            _answer(request.receive, domain, [body], explainers[domain]), domain, "/v1/{domain}/explain", "explanation"
        )
        if isinstance(answer, ExplanationUnavailableError):  # e.g. integrated gradients on an int8 champion
            raise HTTPException(status.HTTP_409_CONFLICT, f"{domain} v{answered_by.version}: {answer}")
        if isinstance(answer, ValueError):  # a label the served model does not have
            return _unprocessable("label", str(answer))
        return JSONResponse({"domain": domain, "version": answered_by.version, **answer.as_dict()})

    def _unprocessable(field: str, message: str) -> JSONResponse:
        """A 422 for a body that is valid JSON but names what the served model does not have, shaped like every
        other validation error."""
        error = {"type": "value_error", "loc": ["body", field], "msg": message}
        return JSONResponse(_validation_payload([error]), status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    (predict_route,) = (r for r in app.router.routes if getattr(r, "path", None) == "/v1/{domain}/predict")
    # add_middleware puts each new one outside the previous: metrics → key check → body size → predict fast
    # path → FastAPI's routes.
    app.add_middleware(
        PredictFastPath,
        request_model=PredictRequest,
        handler=predict_payload,
        error_payload=_validation_payload,
        route=predict_route,
        early_refusal=_refuse_if_full,
    )
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(
        ApiKeyMiddleware,
        keys=keys,
        protected_prefix="/v1/",
        protected_paths=OPERATIONAL_PATHS if config.protect_operational else (),
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics, router=app.router)
    return app


def _freeze_long_lived_objects() -> None:
    """Move every object alive now (libraries, models, tokenizers: millions) out of the garbage collector's scans.

    Why: under load the requests' short-lived objects trigger collections, and each full one walked all
    of them: measured 268 ms with the event loop stopped, which alone put p99 over 200 ms. Frozen objects
    are still freed by reference counting; after a hot swap this runs again once the old model's last batch
    is over (``REFREEZE_AFTER_SWAP_SECONDS``): it unfreezes and collects first, so cyclic garbage of the old
    model is not kept forever (one full collection per promotion).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def _disconnected(receive: Callable[[], Awaitable[Any]]) -> None:
    """Return when the client disconnects (the request body having been read, nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass
