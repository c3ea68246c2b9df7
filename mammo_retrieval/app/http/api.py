"""The FastAPI app: a thin edge over one warm Workspace. Routes parse, call the library and render JSON;
errors map to statuses once (``errors.py``); the workspace, metrics and thumbnails are injected with
``Depends``. JSON field names are those of ``mretrieve query --format json``."""
from __future__ import annotations

import base64
import logging
import math
import threading
import time
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from importlib import resources
from pathlib import PurePath
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BeforeValidator
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from mammo_retrieval import __version__
from mammo_retrieval.app.http import auth
from mammo_retrieval.app.http.errors import error_body, http_status
from mammo_retrieval.app.http.metrics import Metrics
from mammo_retrieval.app.http.thumbnails import ThumbnailCache, encode_png
from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.core.errors import MammoRetrievalError, NotFoundError
from mammo_retrieval.core.timing import Stopwatch
from mammo_retrieval.dicom.header import CONTROL_CHARACTERS, IDENTITY_LIMITS
from mammo_retrieval.dicom.reader import InMemoryDicom
from mammo_retrieval.pacs.kos import referenced_sops
from mammo_retrieval.search.filters import LATERALITIES, VIEW_FILTERS
from mammo_retrieval.search.query import QueryFilters, QueryResult
from mammo_retrieval.storage.catalog import repository as repo

logger = logging.getLogger(__name__)

WARM_UP_RETRY_S = 5.0  # after a failed warm-up, /healthz tries again at most this often
DEFAULT_MAX_UPLOAD = 512 * 1024 * 1024  # a full-field DBT frame set is far below this; a typo'd upload is not
DICOM_TYPES = ("application/dicom", "application/octet-stream")
CACHE_CONTROL = "private, max-age=86400"  # patient data: browsers may keep it, shared caches may not
DOCS_STATIC = "/static-docs"  # Swagger UI's files (fastapi-offline), beside our own /static

# Path parameters are checked here, at the edge, so that no malformed value reaches the catalog (PostgreSQL
# refuses a NUL in a text parameter with an error of its own); a bad one is 422 invalid_request naming it.
# The rule is ingest's own (dicom.header.check_storable: no control character, the catalog's lengths), so
# the two cannot drift apart. The standard allows digits and dots only in UIDs, but archives hold UIDs
# that break it, and ingest keeps those images.
NO_CONTROL_CHARACTER = f"^[^{CONTROL_CHARACTERS}]+$"
SopInstanceUid = Annotated[str, Path(pattern=NO_CONTROL_CHARACTER, max_length=IDENTITY_LIMITS["sop_instance_uid"],
                                     description="an indexed image's SOPInstanceUID")]
StudyInstanceUid = Annotated[str, Path(pattern=NO_CONTROL_CHARACTER,
                                       max_length=IDENTITY_LIMITS["study_instance_uid"],
                                       description="a StudyInstanceUID")]
StudyKey = Annotated[str, Path(pattern=NO_CONTROL_CHARACTER, max_length=IDENTITY_LIMITS["study_key"],
                               description="a study's AccessionNumber, or its StudyInstanceUID where that is empty")]


class AnyText(Convertor):
    """A path segment that may hold "/" (an AccessionNumber 2023/0001 arrives decoded from %2F) and any other
    character, so that the parameter's own rule, not the router, judges it (422 naming it, not 404)."""

    regex = "(?s:.+)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("any_text", AnyText())


def _route_of(request: Request) -> str:
    """The route's template (/api/v1/studies/{study_key}/similar), for logs and metrics: a request's own path
    may hold an AccessionNumber or a UID, which a log line should not carry."""
    route = request.scope.get("route") or _matching_route(request)
    return getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"


def _matching_route(request: Request) -> object | None:
    """FastAPI's own /docs and /openapi.json leave no route in the scope: find the one that matches."""
    for route in request.app.router.routes:
        if route.matches(request.scope)[0] is Match.FULL:
            return route
    return None


class UploadError(MammoRetrievalError):
    """A request body that is not a DICOM upload (wrong content type, too large, empty)."""

    code = "bad_upload"

    def __init__(self, message: str, status: int, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


@dataclass
class Health:
    state: str = "loading"  # loading -> ok | error
    message: str | None = None
    loaded_at: float | None = None


@dataclass
class ServerState:
    """What every request shares: one workspace, its metrics and thumbnails, and the warm-up's outcome."""
    workspace: Workspace
    token: str | None = None
    max_upload: int = DEFAULT_MAX_UPLOAD
    metrics: Metrics = field(default_factory=Metrics)
    health: Health = field(default_factory=Health)
    thumbnails: ThumbnailCache | None = None
    warm_up_retry_s: float = WARM_UP_RETRY_S
    _warm_up_at: float = field(default=-math.inf, repr=False)
    _warming: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.thumbnails = ThumbnailCache(self.workspace.cached_image)

    def warm_up(self) -> None:
        """Build the encoder and load the index before the first query asks for them."""
        self._warm_up_at = time.monotonic()
        try:
            self.refresh_serving()
            self.health = Health("ok", loaded_at=time.time())
        except MammoRetrievalError as exc:  # e.g. nothing ingested yet: queries will say so; health shows it
            self.health = Health("error", exc.message)
            logger.warning("warm-up: %s", exc.message)
        except Exception as exc:  # noqa: BLE001 - a failed warm-up must not kill the server; health shows it
            self.health = Health("error", f"{type(exc).__name__}: {exc}")
            logger.exception("warm-up failed")

    def current_health(self) -> Health:
        """The warm-up's outcome. After a failure (nothing ingested yet, say) the warm-up is tried again, at most
        every ``warm_up_retry_s`` and by one request at a time, so that the health turns ok once there is
        something to serve, without a restart."""
        retry = self.health.state == "error" and time.monotonic() - self._warm_up_at >= self.warm_up_retry_s
        if retry and self._warming.acquire(blocking=False):
            try:
                self.warm_up()
            finally:
                self._warming.release()
        return self.health

    def refresh_serving(self) -> dict:
        info = self.workspace.search.info()
        self.metrics.set_serving(info.model_key, info.encoder, info.index_type, info.ntotal)
        return asdict(info)


def get_state(request: Request) -> ServerState:
    return request.app.state.server


def _any_case(value: object) -> object:
    """As the CLI's choices (case-insensitive): ``cc`` is ``CC``; an empty value is no filter."""
    return (value.upper() or None) if isinstance(value, str) else value


# A value outside the list is 422 invalid_request naming the parameter and the values it takes.
ViewFilter = Annotated[Literal[VIEW_FILTERS] | None, BeforeValidator(_any_case),
                       Query(description=f"only hits of this view: {', '.join(VIEW_FILTERS)}")]
LateralityFilter = Annotated[Literal[LATERALITIES] | None, BeforeValidator(_any_case),
                             Query(description=f"only hits of this laterality: {' or '.join(LATERALITIES)}")]


def query_filters(view: ViewFilter = None, laterality: LateralityFilter = None,
                  exclude_same_patient: bool = False) -> QueryFilters:
    return QueryFilters(view=view, laterality=laterality, exclude_same_patient=exclude_same_patient)


K = Query(10, ge=1, le=1000, description="number of hits")


def _result_body(result: QueryResult, watch: Stopwatch, *, picture: bool = False) -> dict:
    body = result.as_dict()
    body["timings_ms"] = watch.as_ms()
    if picture and result.picture is not None:
        body["query_thumbnail"] = "data:image/png;base64," + base64.b64encode(
            encode_png(result.picture, 256)).decode()
    return body


class InMemoryMultiPartParser(MultiPartParser):
    """Starlette's multipart parser with its file parts kept in memory. Starlette spools a file part to a
    temporary file past 1 MiB; here the spool threshold is the upload limit, which the whole body is held
    to before the parser sees it, so a part never reaches it."""

    def __init__(self, headers: Headers, stream: AsyncGenerator[bytes, None], limit: int) -> None:
        super().__init__(headers, stream, max_files=1, max_fields=16, max_part_size=limit)
        self.spool_max_size = limit


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request its client abandoned: nobody reads the response,
# but the request metrics and the log line say what happened


def _too_large(message: str) -> UploadError:
    return UploadError(message, 413, hint="send a smaller file, or raise the server's --max-upload-mb")


async def capped_body(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The request body a chunk at a time, refused (413) as soon as it passes ``limit`` bytes: a declared
    Content-Length before anything is read, a chunked body while it is read."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(f"upload of {declared} bytes exceeds the limit of {limit} bytes")
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(f"upload exceeds the limit of {limit} bytes")
            yield chunk
    except ClientDisconnect:  # the caller's doing, not a server error: no traceback, not counted as a 500
        raise UploadError(f"the client closed the connection after {size} bytes of its upload",
                          CLIENT_CLOSED_REQUEST) from None


async def read_upload(request: Request, limit: int) -> InMemoryDicom:
    """The request's DICOM file, held in memory only: a raw ``application/dicom`` body or one multipart file,
    either of at most ``limit`` bytes (a multipart body counts whole, its framing included)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in DICOM_TYPES:
        name, data = "upload.dcm", b"".join([chunk async for chunk in capped_body(request, limit)])
    elif kind == "multipart/form-data":
        name, data = await _multipart_file(request, limit)
    else:
        raise UploadError(f"unsupported content type '{kind or 'none'}': send one DICOM file as "
                          "application/dicom, or as a multipart form file", 415)
    if not data:
        raise UploadError("empty upload", 400)
    return InMemoryDicom(name, data)


async def _multipart_file(request: Request, limit: int) -> tuple[str, bytes]:
    body = capped_body(request, limit)
    try:
        form = await InMemoryMultiPartParser(request.headers, body, limit).parse()
    except MultiPartException as exc:
        raise UploadError(f"malformed multipart upload: {exc.message}", 400) from None
    finally:
        await body.aclose()
    try:
        files = [v for v in form.values() if hasattr(v, "read")]
        if not files:
            raise UploadError("multipart upload holds no file", 400)
        return PurePath(files[0].filename or "upload.dcm").name, await files[0].read()
    finally:
        await form.close()


def api_router() -> APIRouter:
    router = APIRouter(prefix="/api/v1")

    @router.post("/query", summary="Search with an uploaded DICOM (application/dicom or multipart)")
    async def query_upload(request: Request, k: int = K, filters: QueryFilters = Depends(query_filters),
                           thumbnail: bool = Query(False, description="include the query's picture as a data URL"),
                           state: ServerState = Depends(get_state)) -> dict:
        upload = await read_upload(request, state.max_upload)
        watch = Stopwatch()
        result = await run_in_threadpool(state.workspace.search.query_file, upload, k, filters, watch,
                                         keep_picture=thumbnail)
        state.metrics.observe_stages(watch.stages)
        return _result_body(result, watch, picture=thumbnail)

    @router.get("/images/{sop_instance_uid:any_text}/similar", summary="Neighbours of an indexed image (nothing decoded)")
    def similar(sop_instance_uid: SopInstanceUid, k: int = K, filters: QueryFilters = Depends(query_filters),
                state: ServerState = Depends(get_state)) -> dict:
        watch = Stopwatch()
        result = state.workspace.search.similar(sop_instance_uid, k, filters, watch)
        state.metrics.observe_stages(watch.stages)
        return _result_body(result, watch)

    @router.get("/studies/{study_key:any_text}/similar", summary="The k most similar studies, fused view by view")
    def similar_studies(study_key: StudyKey, k: int = K, exclude_same_patient: bool = False,
                        rule: Literal["mean_pooled", "view_best_mean"] = "mean_pooled",
                        state: ServerState = Depends(get_state)) -> dict:
        return state.workspace.search.similar_studies(study_key, k, rule=rule,
                                                      exclude_same_patient=exclude_same_patient).as_dict()

    @router.get("/images/{sop_instance_uid:any_text}/thumbnail.png", summary="PNG from the preprocessed cache",
                response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def thumbnail(request: Request, sop_instance_uid: SopInstanceUid, size: int = Query(256, ge=32, le=1024),
                  state: ServerState = Depends(get_state)) -> Response:
        state.workspace.search.record(sop_instance_uid)  # only indexed images, and 404 before any decoding
        settings = state.workspace.encoder.settings
        etag = state.thumbnails.etag(settings, sop_instance_uid, size)
        headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(state.thumbnails.png(settings, sop_instance_uid, size), media_type="image/png",
                        headers=headers)

    @router.get("/info", summary="The serving model and index (the page footer)")
    def info(state: ServerState = Depends(get_state)) -> dict:
        return {"version": __version__, **state.refresh_serving()}

    @router.get("/status", summary="What `mretrieve status --format json` says")
    def status(state: ServerState = Depends(get_state)) -> dict:
        return state.workspace.status()

    @router.get("/images/{sop_instance_uid:any_text}/similar.kos", response_class=Response,
                summary="Neighbours of an indexed image as a DICOM Key Object Selection document",
                responses={200: {"content": {"application/dicom": {}}}})
    def similar_kos(sop_instance_uid: SopInstanceUid, k: int = K, filters: QueryFilters = Depends(query_filters),
                    state: ServerState = Depends(get_state)) -> Response:
        _, document = state.workspace.similar_kos(k=k, sop_instance_uid=sop_instance_uid, filters=filters)
        return _dicom(document, f"similar-{sop_instance_uid}.dcm")

    @router.get("/images/{sop_instance_uid:any_text}", summary="An indexed image's metadata")
    def image(sop_instance_uid: SopInstanceUid, state: ServerState = Depends(get_state)) -> dict:
        record = state.workspace.search.record(sop_instance_uid)
        body = {k: v for k, v in asdict(record).items() if k not in ("image_id", "vector_id")}
        body["thumbnail"] = f"/api/v1/images/{quote(sop_instance_uid, safe='')}/thumbnail.png"
        return body

    @router.get("/qc/kos", summary="Studies with flagged images in the latest QC sweep, each with its KOS link")
    def qc_kos_list(top: int = Query(50, ge=1, le=10000), state: ServerState = Depends(get_state)) -> dict:
        documents = state.workspace.qc_kos(top)
        return {"documents": [{"study_instance_uid": d.StudyInstanceUID, "images": len(referenced_sops(d)),
                               "url": f"/api/v1/qc/kos/{quote(d.StudyInstanceUID, safe='')}?top={top}"}
                              for d in documents]}

    @router.get("/qc/kos/{study_instance_uid:any_text}", response_class=Response,
                summary="One study's flagged images of the latest QC sweep as a Key Object Selection document",
                responses={200: {"content": {"application/dicom": {}}}})
    def qc_kos(study_instance_uid: StudyInstanceUid, top: int = Query(50, ge=1, le=10000),
               state: ServerState = Depends(get_state)) -> Response:
        for document in state.workspace.qc_kos(top, study=study_instance_uid):
            return _dicom(document, f"qc-{study_instance_uid}.dcm")
        raise NotFoundError(f"no flagged image of study {study_instance_uid} among the latest sweep's top {top}")

    @router.get("/qc/latest", summary="The latest QC sweep: outliers, duplicate pairs, header flags, what is new")
    def qc_latest(top: int = Query(50, ge=1, le=10000), state: ServerState = Depends(get_state)) -> dict:
        with state.workspace.db.session() as s:
            sweep = repo.required_qc_sweep(s, top)
        body = asdict(sweep)
        compared = sweep.previous_run_id is not None
        for row in body["scores"]:
            row["new"] = compared and row["rank"] <= top and (row["previous_rank"] is None
                                                              or row["previous_rank"] > top)
        return body

    return router


def _dicom(document, filename: str) -> Response:
    import io
    import re
    filename = re.sub(r"[^0-9A-Za-z.-]", "_", filename)  # a path parameter never shapes a header
    buffer = io.BytesIO()
    document.save_as(buffer, enforce_file_format=True)
    return Response(buffer.getvalue(), media_type="application/dicom",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"})


def same_origin(path: str) -> str:
    """``path`` as a redirect target on this origin: its leading slashes and backslashes become one slash,
    for a browser reads ``//host/x`` (and ``/\\host/x``) as another host."""
    return "/" + path.lstrip("/\\")


def _page(name: str) -> str:
    return resources.files("mammo_retrieval.app.http").joinpath("static", name).read_text(encoding="utf-8")


def create_app(workspace: Workspace, *, token: str | None = None, max_upload: int = DEFAULT_MAX_UPLOAD,
               warm_up: bool = True) -> FastAPI:
    """One app over one workspace. With ``token``, every request but /healthz must present it."""
    state = ServerState(workspace, token=token, max_upload=max_upload)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warm_up:
            threading.Thread(target=state.warm_up, name="warm-up", daemon=True).start()
        yield

    # FastAPI's own /docs loads Swagger UI from a CDN; fastapi-offline serves the same pages from its wheel
    app = FastAPIOffline(title="mammo_retrieval", version=__version__, lifespan=lifespan,
                         description="Similarity search over an archive of mammograms.",
                         static_url=DOCS_STATIC, redoc_url=None)  # ReDoc's page asks a CDN for a logo
    app.state.server = state

    @app.exception_handler(MammoRetrievalError)
    async def library_error(request: Request, exc: MammoRetrievalError) -> JSONResponse:
        status = exc.status if isinstance(exc, UploadError) else http_status(exc)
        logger.info("%s %s -> %d %s", request.method, _route_of(request), status, exc.code)
        return JSONResponse(error_body(exc), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        return JSONResponse({"error": "invalid_request", "message": problems, "hint": "see /docs",
                             "remedies": []}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def no_such_route(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """The framework's own refusals (no such route, a method not allowed) in our error shape. The path is
        not echoed: it may hold an AccessionNumber."""
        try:
            code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        except ValueError:
            code = "http_error"
        message = str(exc.detail)
        if exc.status_code == 404 and request.scope.get("route") is None:
            message = "no such route"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed here"
        return JSONResponse({"error": code, "message": message, "hint": "see /docs for the API", "remedies": []},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, _route_of(request))
        return JSONResponse({"error": "internal_error", "message": f"{type(exc).__name__} (see the server log)",
                             "hint": None, "remedies": []}, status_code=500)

    @app.middleware("http")
    async def guard_and_measure(request: Request, call_next):
        started = time.perf_counter()
        if token is not None and request.url.path not in auth.OPEN_PATHS:
            given = request.query_params.get("token")
            if given is not None and request.method == "GET" and auth.token_matches(token, given):
                clean = request.url.remove_query_params("token")
                response = RedirectResponse(same_origin(clean.path) + (f"?{clean.query}" if clean.query else ""),
                                            303)
                response.set_cookie(auth.COOKIE, token, httponly=True, samesite="strict",
                                    secure=request.url.scheme == "https")
                return response
            presented = auth.bearer(request.headers.get("authorization")) or request.cookies.get(auth.COOKIE)
            if not auth.token_matches(token, presented):
                return JSONResponse({"error": "unauthorized", "message": "this server requires a token",
                                     "hint": "send `Authorization: Bearer <token>`, or open a page once with "
                                             "?token=<token>", "remedies": []},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        try:
            response = await call_next(request)
        except Exception:
            # an unexpected error passes this middleware on its way to the 500 handler: count it here,
            # or the failures most worth an alert would be missing from the request metrics
            state.metrics.observe_request(_route_of(request), request.method, 500, time.perf_counter() - started)
            raise
        state.metrics.observe_request(_route_of(request), request.method, response.status_code,
                                      time.perf_counter() - started)
        return response

    @app.get("/healthz", summary="loading until the model and index are warm, then ok")
    def healthz() -> JSONResponse:
        health = state.current_health()
        body = {"status": health.state, "version": __version__}
        if health.message:
            body["message"] = health.message
        return JSONResponse(body, status_code=200 if health.state == "ok" else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.include_router(api_router())

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def search_page() -> str:
        return _page("index.html")

    @app.get("/study", response_class=HTMLResponse, include_in_schema=False)
    def study_page() -> str:
        return _page("study.html")

    @app.get("/qc", response_class=HTMLResponse, include_in_schema=False)
    def qc_page() -> str:
        return _page("qc.html")

    app.mount("/static", StaticFiles(packages=[("mammo_retrieval.app.http", "static")]), name="static")
    return app

