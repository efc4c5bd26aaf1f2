"""The HTTP API: the seed's ``PUT /v1/services/message/gc`` contract, plus status, metrics, health.

A thin shell: a PUT writes a queued ``gc_runs`` row on every node (or joins the active one) and
answers at once; the worker (:mod:`engine.service.worker`) claims and executes the runs and delivers the
completion webhooks. Answers are the seed's bodies built by :mod:`engine.service.contract`.

HTTP status codes
-----------------
``PUT /v1/services/message/gc``
    - **200** GC queued, or already queued/running and joined (no second run starts).
      Single instance: ``{"services":{"message":{"gc":{"status":"processing"}}},"meta":{...}}``.
      Multiconnect: one key per node, ``{"status":"processing"}`` or ``{"errors":[{"code":1014,...}]}``
      for a node that cannot be reached (the others still start). 200 rather than 202: the seed
      names no code, and a client written against it most likely expects 200.
    - **503** single instance that cannot start (database unreachable, not migrated, table
      missing): ``meta`` + ``errors`` (1014). Multiconnect when *no* node could start (body as 200).
    - **422** body is not JSON (1025 Invalid request) or has a bad/unknown field (1009 Parameter
      value is not valid), one ``errors`` entry per problem.
``GET /v1/services/message/gc``
    - **200** the newest run of each node; **503** single instance unreachable (1014).
Everywhere
    - **401** missing or wrong ``Authorization: Bearer <token>`` when a token is configured
      (1005 Access denied, ``WWW-Authenticate: Bearer``); ``/health`` and the docs are open.
    - Without a token (loopback only), against DNS rebinding and cross-origin pages
      (:mod:`engine.service.loopback_only`): **400** a ``Host`` that is not a loopback name
      (1025 Invalid request); **403** an ``Origin`` that is not a loopback origin (1005).
    - **404** unknown path (1006 Resource not found); **405** wrong method (1025, ``Allow`` header);
      **500** unexpected error (1014). Every error body is ``{"meta":...,"errors":[...]}``.
``GET /v1/overview`` (the status page's data): **200** every node, each with its newest runs,
    outbox and guard figures, or its 1014 when its database cannot be read.
``GET /``: the status page (:mod:`engine.service.page`), open: it holds no data.
``GET /health``: **200** while the worker threads live (or run elsewhere), **503** if one died.
``GET /metrics``: **200** Prometheus text format.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from engine.errors import UsageError
from engine.service import contract, page, requests
from engine.service.api_models import (
    CompletionWebhook,
    ErrorAnswer,
    GcRequest,
    Health,
    LatestRun,
    MultiStartAnswer,
    MultiStatusAnswer,
    Overview,
    SingleStartAnswer,
    SingleStatusAnswer,
    WorkerState,
)
from engine.service.body_limit import MAX_BODY_BYTES, BodyLimit
from engine.service.loopback_only import LoopbackOnly
from engine.service.metrics import Metrics
from engine.service.overview import read_nodes
from engine.service.requests import NodeResult
from engine.service.settings import ServiceSettings
from engine.service.worker import Worker

GC_PATH = "/v1/services/message/gc"
OVERVIEW_PATH = "/v1/overview"


class ApiError(Exception):
    """An answer in the ``errors`` shape, raised from anywhere in a request."""

    def __init__(self, status: int, code: int, details: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(details)
        self.status, self.code, self.details, self.headers = status, code, details, headers


def _errors(status: int, entries: list[dict[str, Any]],
            headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(contract.errors_answer(entries), status_code=status, headers=headers)


def _error_response(description: str) -> dict[str, Any]:
    return {"model": ErrorAnswer, "description": description}


COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: _error_response(f"Request body over {MAX_BODY_BYTES} bytes (1025 Invalid request)."),
    405: _error_response("Method not allowed on this path (1025 Invalid request); see the Allow header."),
    500: _error_response("Unexpected error (1014 Internal error)."),
}
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: _error_response("Missing or wrong bearer token (1005 Access denied)."),
}


def create_app(settings: ServiceSettings) -> FastAPI:
    """The service for these settings; starts the in-service worker unless ``run_worker`` is off."""
    metrics = Metrics(settings)
    worker = Worker(settings, metrics) if settings.run_worker else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if worker is not None:
            worker.start()
        yield
        if worker is not None:
            worker.close(timeout_s=1.0)

    app = FastAPI(title="msggc", version=contract.package_version(), lifespan=lifespan,
                  summary="Batched garbage collection of the messages table, behind the seed's contract.",
                  responses=COMMON_RESPONSES)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit)
    if not settings.token:
        app.add_middleware(LoopbackOnly)  # outermost: a foreign request is refused before its body is read
    auth = [Depends(_bearer_check(settings.token))] if settings.token else []
    guarded = UNAUTHORIZED if settings.token else {}
    multi = settings.multiconnect

    @app.put(GC_PATH, dependencies=auth, response_model=None, summary="Start garbage collection",
             responses={200: {"model": MultiStartAnswer if multi else SingleStartAnswer,
                              "description": "Queued or joined; answers at once, the webhook follows."},
                        503: {"model": MultiStartAnswer if multi else ErrorAnswer,
                              "description": "No node could start (1014 Internal error)."},
                        400: _error_response("Body that cannot be parsed, e.g. nested too deep (1025)."),
                        422: _error_response("Body not JSON (1025) or invalid fields (1009)."), **guarded})
    def start_gc(body: Annotated[GcRequest | None, Body()] = None) -> JSONResponse:
        """Queue a GC on every node, or join the one already running there. Repeated PUTs
        continue where the last run stopped. One completion webhook per node follows."""
        overrides = body.overrides() if body else {}
        try:
            settings.check_options(overrides)
        except UsageError as exc:
            return _errors(422, [contract.error(str(exc), code=contract.PARAMETER_NOT_VALID)])
        results = requests.request_gc(settings, overrides)
        if worker is not None:
            worker.wake()
        return _per_node(results, lambda _started: contract.processing(), multi)

    @app.get(GC_PATH, dependencies=auth, response_model=None, summary="Status of the latest runs",
             responses={200: {"model": MultiStatusAnswer if multi else SingleStatusAnswer,
                              "description": "The newest run of each node."},
                        503: {"model": MultiStatusAnswer if multi else ErrorAnswer,
                              "description": "No node could be read (1014 Internal error)."}, **guarded})
    def gc_status() -> JSONResponse:
        """Per node: status, rows deleted so far, rows/s, started/finished, last error."""
        return _per_node(requests.read_status(settings), _run_status, multi)

    @app.get(OVERVIEW_PATH, dependencies=auth, response_model=Overview, summary="The status page's data",
             responses=guarded)
    def overview() -> JSONResponse:
        """Per node: the newest run's progress and chart, the recent runs, webhooks waiting, the
        guard's figures; a node whose database cannot be read has its 1014 ``error``."""
        body = Overview(generated_at=datetime.now(UTC), nodes=read_nodes(settings), **_process_fields(worker))
        return JSONResponse(body.model_dump(mode="json"), headers={"Cache-Control": "no-store"})

    @app.get("/metrics", dependencies=auth, response_class=Response, summary="Prometheus metrics",
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                              "description": "Prometheus text format."}, **guarded})
    def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", response_model=Health, summary="Liveness",
             responses={503: {"model": Health, "description": "A worker thread died."}})
    def health() -> JSONResponse:
        fields = _process_fields(worker)
        body = Health(status="ok" if fields["worker"] != "stopped" else "unhealthy", **fields)
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.status == "ok" else 503)

    @app.webhooks.post("message-gc-completion")
    def completion_webhook(body: CompletionWebhook) -> None:
        """POSTed to the configured callback URL once per node when its GC ends; the callback
        server answers 2xx, else the notice is retried with exponential backoff."""

    page.install(app)
    return app


def _process_fields(worker: Worker | None) -> dict[str, Any]:
    """What ``/health`` and the overview both say of this process: version, worker, schedule."""
    state: WorkerState = "disabled" if worker is None else "running" if worker.alive else "stopped"
    schedule = worker.schedule if worker is not None else None
    return {"version": contract.package_version(), "worker": state,
            "schedule": schedule.trigger.describe() if schedule else None,
            "next_scheduled_gc": schedule.next_at if schedule else None}


def _per_node(results: list[NodeResult[Any]], render: Callable[[Any], dict[str, Any]],
              multi: bool) -> JSONResponse:
    """The seed's two shapes: a single instance answers or fails as a whole; multiconnect has one
    key per node, each rendered or an ``errors`` entry, and fails only if every node failed."""
    if not multi:
        only = results[0]
        if only.error is not None:
            return JSONResponse(contract.error_answer(only.error), status_code=503)
        return JSONResponse(contract.start_answer(render(only.value)))
    gc = {r.node.name: render(r.value) if r.error is None else contract.node_failure(r.error)
          for r in results}
    status = 200 if any(r.ok for r in results) else 503
    return JSONResponse(contract.start_answer(gc), status_code=status)


def _run_status(row: dict[str, Any] | None) -> dict[str, Any]:
    return (LatestRun.model_validate(row) if row else LatestRun(status="idle")).model_dump(mode="json")


BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer <token>")
"""Module level: FastAPI resolves the (postponed) annotations below in the module's namespace."""


def _bearer_check(token: str) -> Callable[..., None]:
    def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        """Constant-time comparison: the token is the only thing between the network and DELETE."""
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, token.encode()):
            raise ApiError(401, contract.ACCESS_DENIED,
                           "missing or invalid token: send Authorization: Bearer <token>",
                           headers={"WWW-Authenticate": "Bearer"})

    return check


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in the seed's ``{"meta":...,"errors":[...]}`` shape."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _errors(exc.status, [contract.error(exc.details, code=exc.code)], exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        code, details = _http_error(request, exc, headers.get("Allow", ""))
        return _errors(exc.status_code, [contract.error(details, code=code)], headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _errors(422, [_validation_entry(problem) for problem in exc.errors()])

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return _errors(500, [contract.error(f"unexpected error: {type(exc).__name__}")])


def _allowed_methods(request: Request) -> list[str]:
    """Every method of every route on this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def _http_error(request: Request, exc: StarletteHTTPException, allowed: str) -> tuple[int, str]:
    if exc.status_code == 404:
        return contract.RESOURCE_NOT_FOUND, f"no resource at {request.url.path}"
    if exc.status_code == 405:
        return contract.INVALID_REQUEST, f"method {request.method} is not allowed on {request.url.path}" + (
            f"; use {allowed}" if allowed else "")
    code = contract.INTERNAL_ERROR if exc.status_code >= 500 else contract.INVALID_REQUEST
    return code, str(exc.detail)


def _validation_entry(problem: dict[str, Any]) -> dict[str, Any]:
    where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
    if problem.get("type") == "json_invalid":
        return contract.error(f"the body is not valid JSON: {problem.get('msg')}",
                              code=contract.INVALID_REQUEST)
    return contract.error(f"{where}: {problem.get('msg')}", code=contract.PARAMETER_NOT_VALID)
