"""The ASGI app: Open Inference Protocol routes, ``/classify``, ``/metrics``.

Plain Starlette routes (no pydantic on the hot path), one ``_Server`` method each.  Every
handler is marked ``endpoint(label)`` and wrapped when routed: the wrapper checks the API
key, turns ``RequestError`` into its status with ``{"error": ...}``, turns anything
unexpected into a logged 500, and records the request in the Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from kdtool import __version__
from kdtool.deploy.server import images, protocol
from kdtool.deploy.server.batcher import DynamicBatcher, InferenceFailed
from kdtool.deploy.server.metrics import Metrics
from kdtool.deploy.server.model import OnnxModel
from kdtool.deploy.server.protocol import RequestError
from kdtool.runinfo import usable_cores

log = logging.getLogger("kdtool.serve")
EXTENSIONS = ["binary_tensor_data", "classification"]
OFFLOAD_BYTES = 256 * 1024  # parse larger bodies on a thread: keep the event loop responsive
DECODE_THREADS = min(8, usable_cores())  # /classify's image decoding


@dataclass
class ServerConfig:
    max_batch: int = 32
    max_delay_ms: float = 0.0
    max_queue: int = 512  # images waiting for a batch; more get 503
    workers: int = 1  # ONNX Runtime calls in flight at once
    max_body_mb: float = 16.0
    body_idle_s: float = 15.0  # a body's bytes stop coming for this long: 408, the task ends
    api_key: str | None = None
    default_top_k: int = 5


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(protocol.dumps(obj), status, headers, media_type="application/json")


# A full queue drains within a batch or two: clients with built-in retry (HTTP libraries,
# load balancers) read this header rather than the body's "retry later".
RETRY_AFTER_S = 1


# Answers after which the connection cannot go on: the rest of a stalled body may still
# come, and would be read as the next request.
CLOSING = {408}


def error_response(message: str, status: int) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else \
        {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else \
        {"Connection": "close"} if status in CLOSING else None
    return json_response({"error": message}, status, headers)


def create_app(model: OnnxModel, config: ServerConfig | None = None) -> Starlette:
    server = _Server(model, config or ServerConfig())
    app = Starlette(
        routes=server.routes(),
        lifespan=server.lifespan,
        exception_handlers={Exception: server.unhandled, 404: server.http_error,
                            405: server.http_error},
    )
    app.state.model, app.state.batcher, app.state.metrics = model, server.batcher, server.metrics
    return app


def endpoint(label: str, auth: bool = True):
    """Mark a ``_Server`` method as a route handler whose requests count under ``label`` in
    the metrics; ``auth``: behind the API key (health checks are not)."""
    def mark(handler):
        handler.endpoint = (label, auth)
        return handler

    return mark


class _Server:
    """One model's routes, its batcher and metrics."""

    def __init__(self, model: OnnxModel, config: ServerConfig):
        self.model, self.config = model, config
        self.metrics = Metrics(model.name, model.providers)
        self.batcher = DynamicBatcher(
            model.run,
            max_batch=config.max_batch,
            max_delay_s=config.max_delay_ms / 1000,
            max_queue=config.max_queue,
            fixed_batch=model.fixed_batch,
            metrics=self.metrics,
            workers=config.workers,
        )
        self.body_limit = int(config.max_body_mb * 1024 * 1024)
        self.decode_pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="kdtool-decode")
        self.api_key = config.api_key.encode() if config.api_key else None

    def routes(self) -> list[Route]:
        h = self._wrapped
        routes = [
            Route("/v2/health/live", h(self.live)),
            Route("/v2/health/ready", h(self.ready)),
            Route("/v2", h(self.server_metadata)),
            Route("/metrics", h(self.prometheus)),
        ]
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes += [
                Route(prefix, h(self.model_metadata)),
                Route(prefix + "/ready", h(self.model_ready)),
                Route(prefix + "/infer", h(self.infer), methods=["POST"]),
                Route(prefix + "/classify", h(self.classify), methods=["POST"]),
            ]
        return routes

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        await self.batcher.start()
        try:
            yield
        finally:
            await self.batcher.close()  # uvicorn has finished the in-flight requests by now
            self.decode_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ request plumbing

    def _wrapped(self, handler):
        """``handler`` behind the API key (unless its endpoint says otherwise), with
        ``RequestError`` as its status and ``{"error": ...}``, anything unexpected as a
        logged 500, and the request counted and timed in the metrics."""
        label, auth = handler.endpoint

        async def run(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                if auth and not self._authorized(request):
                    raise RequestError(
                        "missing or wrong API key: send the header "
                        "'Authorization: Bearer <key>'",
                        401,
                    )
                response = await handler(request)
            except asyncio.CancelledError:
                if not self.batcher.stopping:
                    raise
                # uvicorn's shutdown grace is over: an answer (not its 500 and a traceback)
                response = error_response("the server stopped before this request finished",
                                          503)
            except RequestError as e:
                response = error_response(e.message, e.status)
            except InferenceFailed as e:
                response = error_response(str(e), 500)
            except Exception as e:  # a bug: log it, answer 500, keep serving
                log.exception("unexpected error on %s %s", request.method, request.url.path)
                response = error_response(
                    f"internal server error ({type(e).__name__}); see the server log", 500
                )
            self.metrics.requests.labels(label, str(response.status_code)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)
            return response

        return run

    def _authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key)

    def _check_model(self, request: Request) -> None:
        name, model = request.path_params["model"], self.model
        if name != model.name:
            raise RequestError(f"unknown model '{name}'; this server serves '{model.name}'", 404)
        version = request.path_params.get("version")
        if version is not None and version != "1":
            raise RequestError(
                f"model '{name}' has no version '{version}'; it has version '1'", 404
            )

    async def _read_body(self, request: Request) -> bytes:
        """The body, at most --max-body-mb, decompressed as its Content-Encoding says.

        Every route that reads a body goes through here, so that /infer and /classify
        (raw or multipart) take gzip/deflate alike and refuse what is over the limit
        before and after decompressing (a zip bomb stops at the limit: 413).
        """
        limit_mb, limit = self.config.max_body_mb, self.body_limit
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(
                f"request body of {int(declared)} bytes is over the "
                f"{limit_mb:g} MB limit (--max-body-mb)",
                413,
            )
        chunks, size = [], 0
        stream = request.stream()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.config.body_idle_s):
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise RequestError(
                        f"no request body bytes for {self.config.body_idle_s:g} s "
                        f"({size} received): the client stalled", 408) from None
                size += len(chunk)
                if size > limit:
                    raise RequestError(
                        f"request body is over the {limit_mb:g} MB limit (--max-body-mb)",
                        413,
                    )
                chunks.append(chunk)
        except ClientDisconnect:
            raise RequestError("the client disconnected", 499) from None
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding")
        if not encoding:
            return body
        # Inflating up to --max-body-mb takes tens of ms: off the loop, as parsing is.
        return await asyncio.get_running_loop().run_in_executor(
            None, protocol.decompress, body, encoding, limit
        )

    # ------------------------------------------------------------------ routes

    @endpoint("health", auth=False)
    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    @endpoint("health", auth=False)
    async def ready(self, request: Request) -> Response:
        ok = self.batcher.ready
        return json_response({"ready": ok}, 200 if ok else 503)

    @endpoint("metadata")
    async def server_metadata(self, request: Request) -> Response:
        return json_response({"name": "kdtool", "version": __version__, "extensions": EXTENSIONS})

    @endpoint("metadata")
    async def model_metadata(self, request: Request) -> Response:
        self._check_model(request)
        model = self.model
        return json_response(
            {
                "name": model.name,
                "versions": ["1"],
                "platform": "onnxruntime_onnx",
                "inputs": [model.input.to_dict()],
                "outputs": [model.output.to_dict()],
                "kdtool": model.describe(),
            }
        )

    @endpoint("ready")
    async def model_ready(self, request: Request) -> Response:
        self._check_model(request)
        ok = self.batcher.ready
        return json_response({"name": self.model.name, "ready": ok}, 200 if ok else 503)

    @endpoint("infer")
    async def infer(self, request: Request) -> Response:
        self._check_model(request)
        body = await self._read_body(request)
        header_length = request.headers.get(protocol.HEADER_LENGTH)
        if len(body) > OFFLOAD_BYTES:
            req = await asyncio.get_running_loop().run_in_executor(
                None, protocol.parse_infer, body, header_length, self.model
            )
        else:
            req = protocol.parse_infer(body, header_length, self.model)
        y = await self.batcher.infer(req.x)
        content, headers = protocol.encode_infer(req, y, self.model)
        media = "application/octet-stream" if headers else "application/json"
        content, encoding = protocol.compress(content, request.headers.get("accept-encoding"))
        if encoding:
            headers["Content-Encoding"] = encoding
        return Response(content, 200, headers, media_type=media)

    @endpoint("classify")
    async def classify(self, request: Request) -> Response:
        self._check_model(request)
        model = self.model
        k = _top_k(request.query_params.get("top_k"), self.config.default_top_k,
                   model.info.num_classes)
        body = await self._read_body(request)
        content_type = request.headers.get("content-type", "")
        if content_type.lower().startswith("multipart/form-data"):
            files = images.multipart_files(body, content_type)
        else:
            files = [(None, body)]

        self.batcher.check_size(len(files))  # before decoding what could never be served

        def prepare() -> np.ndarray:  # decoding a large JPEG takes a while: off the loop
            whats = [f"image '{name}'" if name else "the request body" for name, _ in files]
            opened = [images.open_image(data, what)
                      for (_, data), what in zip(files, whats, strict=True)]
            images.check_request_pixels(opened)  # from the headers: nothing decoded yet
            return np.stack([images.preprocess(images.load(im, what), model.info,
                                               model.input.dtype, what)
                             for im, what in zip(opened, whats, strict=True)])

        # On threads of its own: a flood of large images waits for these, while /infer's
        # parsing and every inflate go on in the loop's default pool.
        x = await asyncio.get_running_loop().run_in_executor(self.decode_pool, prepare)
        y = await self.batcher.infer(x)
        results = []
        for (name, _), row in zip(files, y, strict=True):
            r = {"filename": name} if name else {}
            r["predictions"] = images.top_k(row, k, model.class_names)
            results.append(r)
        return json_response({"model_name": model.name, "model_version": "1", "results": results})

    @endpoint("metrics")
    async def prometheus(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, 200, media_type=content_type)

    @endpoint("other", auth=False)
    async def not_found(self, request: Request) -> Response:
        raise RequestError(
            f"no route {request.method} {request.url.path}; see GET /v2 and "
            f"/v2/models/{self.model.name}",
            404,
        )

    # ------------------------------------------------------------------ Starlette's errors

    async def unhandled(self, request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response("internal server error; see the server log", 500)

    async def http_error(self, request: Request, exc) -> Response:
        if exc.status_code == 404:
            return await self._wrapped(self.not_found)(request)
        self.metrics.requests.labels("other", str(exc.status_code)).inc()
        return error_response(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code)


def _top_k(value: str | None, default: int, num_classes: int) -> int:
    if value is None:
        return min(default, num_classes)
    if not value.isdigit() or not 1 <= int(value) <= num_classes:
        raise RequestError(f"top_k '{value}' must be a whole number from 1 to {num_classes}")
    return int(value)
