"""Run the app on uvicorn: bind (with clear errors), print how to call it, stop gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import resource
import shlex
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from kdtool.deploy.server import guard
from kdtool.deploy.server.app import ServerConfig, create_app
from kdtool.deploy.server.model import OnnxModel
from kdtool.errors import KdtoolError

API_KEY_ENV = "KDTOOL_API_KEY"
FORCED_STOP_S = 2  # after a second Ctrl-C, how long the queued requests may still take
GRACE_S = 20  # how long a stop waits for in-flight requests before cancelling them (under
# the 30 s a container is given to stop before it is killed)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    if api_key is not None and not (api_key.isascii() and api_key.isprintable()
                                    and api_key.strip() == api_key and api_key):
        # Header values travel as bytes and are compared stripped: a space at either end, a
        # blank key or a non-ASCII one (UTF-8 from curl, latin-1 as read) never matches.
        raise KdtoolError(
            f"the API key (--api-key or {API_KEY_ENV}) must be printable ASCII without spaces "
            "at either end: no client could send this one",
            "e.g. a key from: python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
    if not is_loopback(host) and not api_key:
        raise KdtoolError(
            f"binding {host} exposes the model beyond this machine and needs an API key",
            f"pass --api-key KEY or set {API_KEY_ENV} (clients send 'Authorization: Bearer "
            "KEY'), or keep the default --host 127.0.0.1",
        )


def resolve(host: str, port: int) -> tuple:
    """getaddrinfo's first answer for ``host``: (family, type, proto, canonname, address)."""
    try:
        return socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise KdtoolError(
            f"cannot resolve --host '{host}': {e.strerror}",
            "pass an IP address such as 127.0.0.1 or 0.0.0.0",
        ) from None


def bind(host: str, port: int, resolved: tuple | None = None) -> socket.socket:
    """A listening socket; connections made before uvicorn accepts wait in the backlog.
    ``resolved``: resolve's answer for host and port, when the caller has it."""
    family, kind, proto, _, addr = resolved or resolve(host, port)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        where = f"{host}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise KdtoolError(
                f"port {port} on {host} is already in use",
                "stop the other server or pass another --port",
            ) from None
        if e.errno == errno.EACCES:
            raise KdtoolError(
                f"no permission to bind {where}", "ports below 1024 need root: pass --port 8000"
            ) from None
        raise KdtoolError(
            f"cannot bind {where}: {e.strerror}", "pass an address of this machine to --host"
        ) from None
    sock.set_inheritable(True)
    return sock


def base_url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return f"http://{shown}:{port}"


def banner(model: OnnxModel, config: ServerConfig, url: str) -> str:
    i = model.info
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if config.api_key else ""
    m = f"{url}/v2/models/{model.name}"
    x = ", ".join(map(str, model.input.shape[1:]))
    example = shlex.quote(
        f'{{"inputs": [{{"name": "{model.input.name}", "shape": [1, {x}], '
        f'"datatype": "{model.input.datatype}", "data": [...]}}]}}'
    )
    most = min(config.max_batch, model.fixed_batch or config.max_batch)  # as the batcher
    capped = (f" (the graph's static batch, below --max-batch {config.max_batch}: export with "
              "a dynamic --batch for more)" if most < config.max_batch else "")
    wait = (f"within {config.max_delay_ms:g} ms" if config.max_delay_ms
            else "of the requests that queue while one runs")
    batching = (
        f"batches up to {most}{capped} {wait}"
        if most > 1
        else "no batching (--max-batch 1)" if config.max_batch == 1
        else f"no batching{capped}"
    )
    return "\n".join(
        [
            f"kdtool serve: model '{model.name}' ({i.arch or 'onnx'}, "
            f"{i.in_chans}x{i.input_size[0]}x{i.input_size[1]} {i.layout}, "
            f"{i.num_classes} classes, {i.precision}) on "
            f"{', '.join(model.providers)}; {batching}",
            f"  listening on {url}  (model: {m})",
            f"  classify an image:  curl -s{auth} --data-binary @image.jpg '{m}/classify?top_k=3'",
            f"  v2 inference:       curl -s{auth} {m}/infer -d {example}",
            f"  metrics:            curl -s{auth} {url}/metrics",
            *([f"  (the examples read the key from ${API_KEY_ENV}: set it in the client's "
               "shell; the key is never printed)"] if config.api_key else []),
            "  Ctrl-C (or SIGTERM) stops it after the requests in flight.",
        ]
    )


def serve(
    model_path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    provider: str = "cpu",
    threads: int = 0,
    memory_arena: bool = True,
    config: ServerConfig | None = None,
    log_level: str = "warning",
) -> None:
    """Load the model, bind, print the banner and serve until SIGINT/SIGTERM."""
    config = config or ServerConfig()
    resolved = resolve(host, port)  # a host that is no address says so before the key
    check_exposure(host, config.api_key)
    raise_open_files_limit()
    model = OnnxModel(model_path, name=name, provider=provider, threads=threads,
                      memory_arena=memory_arena)
    app = create_app(model, config)
    sock = bind(host, port, resolved)
    logging.getLogger("kdtool.serve").setLevel(logging.INFO)
    server = uvicorn_server(app, log_level)
    sys.stderr.write(banner(model, config, base_url(host, sock)) + "\n")
    sys.stderr.flush()
    server.run(sockets=[sock])
    sys.stderr.write("kdtool serve: stopped\n")


def uvicorn_server(app, log_level: str = "warning") -> GracefulServer:
    """The server ``serve`` runs ``app`` on (and the tests: the same settings)."""
    return GracefulServer(
        uvicorn.Config(
            app,
            loop="auto",
            **guard.http_settings(),
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=GRACE_S,
            timeout_keep_alive=30,
        )
    )


def raise_open_files_limit() -> None:
    """Each connection takes a file descriptor, and a common default soft limit is 1024:
    raise it to the hard limit, so that many idle or slow clients do not starve the rest."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class GracefulServer(uvicorn.Server):
    """uvicorn's Server, but a stop signal ends ``run`` normally instead of re-raising it,
    and a forced stop (a second Ctrl-C) still shuts the app down."""

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:
            # uvicorn skips the app's shutdown when forced: the app would be cancelled at
            # exit and log a traceback. The batcher's queue is short: give it a moment.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FORCED_STOP_S):
                    await self.lifespan.shutdown()

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop without waiting
            return
        self.should_exit = True
        batcher = getattr(getattr(self.config.app, "state", None), "batcher", None)
        if batcher is not None:
            batcher.flush_soon()  # uvicorn takes no new requests: a batch waits for nothing
        sys.stderr.write(
            "kdtool serve: stopping; finishing the requests in flight (Ctrl-C again to stop now)\n"
        )
