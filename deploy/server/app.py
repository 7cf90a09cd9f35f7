"""The ASGI app: Open Inference Protocol routes, ``/classify``, ``/metrics``.

Plain Starlette routes (no pydantic on the hot path).  Every handler is wrapped by
``endpoint(label)``, which checks the API key, turns ``RequestError`` into its status with
``{"error": ...}``, turns anything unexpected into a logged 500, and records the
request in the Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
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

log = logging.getLogger("kdtool.serve")
EXTENSIONS = ["binary_tensor_data", "classification"]
OFFLOAD_BYTES = 256 * 1024  # parse larger bodies on a thread: keep the event loop responsive


@dataclass
class ServerConfig:
    max_batch: int = 32
    max_delay_ms: float = 0.0
    max_queue: int = 512  # images waiting for a batch; more get 503
    workers: int = 1  # ONNX Runtime calls in flight at once
    max_body_mb: float = 16.0
    api_key: str | None = None
    default_top_k: int = 5


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(protocol.dumps(obj), status, headers, media_type="application/json")


# A full queue drains within a batch or two: clients with built-in retry (HTTP libraries,
# load balancers) read this header rather than the body's "retry later".
RETRY_AFTER_S = 1


def error_response(message: str, status: int) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else \
        {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return json_response({"error": message}, status, headers)


def create_app(model: OnnxModel, config: ServerConfig | None = None) -> Starlette:
    config = config or ServerConfig()
    metrics = Metrics(model.name, model.providers)
    batcher = DynamicBatcher(
        model.run,
        max_batch=config.max_batch,
        max_delay_s=config.max_delay_ms / 1000,
        max_queue=config.max_queue,
        fixed_batch=model.fixed_batch,
        metrics=metrics,
        workers=config.workers,
    )
    body_limit = int(config.max_body_mb * 1024 * 1024)
    api_key = config.api_key.encode() if config.api_key else None

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key)

    def endpoint(label: str, auth: bool = True):
        def wrap(handler):
            async def run(request: Request) -> Response:
                t0 = time.perf_counter()
                try:
                    if auth and not authorized(request):
                        raise RequestError(
                            "missing or wrong API key: send the header "
                            "'Authorization: Bearer <key>'",
                            401,
                        )
                    response = await handler(request)
                except RequestError as e:
                    response = error_response(e.message, e.status)
                except InferenceFailed as e:
                    response = error_response(str(e), 500)
                except Exception as e:  # a bug: log it, answer 500, keep serving
                    log.exception("unexpected error on %s %s", request.method, request.url.path)
                    response = error_response(
                        f"internal server error ({type(e).__name__}); see the server log", 500
                    )
                metrics.requests.labels(label, str(response.status_code)).inc()
                metrics.latency.labels(label).observe(time.perf_counter() - t0)
                return response

            return run

        return wrap

    def check_model(request: Request) -> None:
        name = request.path_params["model"]
        if name != model.name:
            raise RequestError(f"unknown model '{name}'; this server serves '{model.name}'", 404)
        version = request.path_params.get("version")
        if version is not None and version != "1":
            raise RequestError(
                f"model '{name}' has no version '{version}'; it has version '1'", 404
            )

    async def read_body(request: Request) -> bytes:
        """The body, at most --max-body-mb, decompressed as its Content-Encoding says.

        Every route that reads a body goes through here, so that /infer and /classify
        (raw or multipart) take gzip/deflate alike and refuse what is over the limit
        before and after decompressing (a zip bomb stops at the limit: 413).
        """
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > body_limit:
            raise RequestError(
                f"request body of {int(declared)} bytes is over the "
                f"{config.max_body_mb:g} MB limit (--max-body-mb)",
                413,
            )
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > body_limit:
                    raise RequestError(
                        f"request body is over the {config.max_body_mb:g} MB limit (--max-body-mb)",
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
            None, protocol.decompress, body, encoding, body_limit
        )

    @endpoint("health", auth=False)
    async def live(request: Request) -> Response:
        return json_response({"live": True})

    @endpoint("health", auth=False)
    async def ready(request: Request) -> Response:
        ok = batcher.ready
        return json_response({"ready": ok}, 200 if ok else 503)

    @endpoint("metadata")
    async def server_metadata(request: Request) -> Response:
        return json_response({"name": "kdtool", "version": __version__, "extensions": EXTENSIONS})

    @endpoint("metadata")
    async def model_metadata(request: Request) -> Response:
        check_model(request)
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
    async def model_ready(request: Request) -> Response:
        check_model(request)
        ok = batcher.ready
        return json_response({"name": model.name, "ready": ok}, 200 if ok else 503)

    @endpoint("infer")
    async def infer(request: Request) -> Response:
        check_model(request)
        body = await read_body(request)
        header_length = request.headers.get(protocol.HEADER_LENGTH)
        if len(body) > OFFLOAD_BYTES:
            req = await asyncio.get_running_loop().run_in_executor(
                None, protocol.parse_infer, body, header_length, model
            )
        else:
            req = protocol.parse_infer(body, header_length, model)
        y = await batcher.infer(req.x)
        content, headers = protocol.encode_infer(req, y, model)
        media = "application/octet-stream" if headers else "application/json"
        content, encoding = protocol.compress(content, request.headers.get("accept-encoding"))
        if encoding:
            headers["Content-Encoding"] = encoding
        return Response(content, 200, headers, media_type=media)

    @endpoint("classify")
    async def classify(request: Request) -> Response:
        check_model(request)
        k = _top_k(request.query_params.get("top_k"), config.default_top_k, model.info.num_classes)
        body = await read_body(request)
        content_type = request.headers.get("content-type", "")
        if content_type.lower().startswith("multipart/form-data"):
            files = images.multipart_files(body, content_type)
        else:
            files = [(None, body)]

        def prepare() -> np.ndarray:  # decoding a large JPEG takes a while: off the loop
            rows = []
            for name, data in files:
                what = f"image '{name}'" if name else "the request body"
                rows.append(
                    images.preprocess(images.decode(data, what), model.info, model.input.dtype,
                                      what)
                )
            return np.stack(rows)

        x = await asyncio.get_running_loop().run_in_executor(None, prepare)
        y = await batcher.infer(x)
        results = []
        for (name, _), row in zip(files, y, strict=True):
            r = {"filename": name} if name else {}
            r["predictions"] = images.top_k(row, k, model.class_names)
            results.append(r)
        return json_response({"model_name": model.name, "model_version": "1", "results": results})

    @endpoint("metrics")
    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, 200, media_type=content_type)

    @endpoint("other", auth=False)
    async def not_found(request: Request) -> Response:
        raise RequestError(
            f"no route {request.method} {request.url.path}; see GET /v2 and "
            f"/v2/models/{model.name}",
            404,
        )

    async def unhandled(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response("internal server error; see the server log", 500)

    async def http_error(request: Request, exc) -> Response:
        if exc.status_code == 404:
            return await not_found(request)
        metrics.requests.labels("other", str(exc.status_code)).inc()
        return error_response(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code)

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/metrics", prometheus),
    ]
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [
            Route(prefix, model_metadata),
            Route(prefix + "/ready", model_ready),
            Route(prefix + "/infer", infer, methods=["POST"]),
            Route(prefix + "/classify", classify, methods=["POST"]),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.close()  # uvicorn has finished the in-flight requests by now

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={Exception: unhandled, 404: http_error, 405: http_error},
    )
    app.state.model, app.state.batcher, app.state.metrics = model, batcher, metrics
    return app


def _top_k(value: str | None, default: int, num_classes: int) -> int:
    if value is None:
        return min(default, num_classes)
    if not value.isdigit() or not 1 <= int(value) <= num_classes:
        raise RequestError(f"top_k '{value}' must be a whole number from 1 to {num_classes}")
    return int(value)
