"""What uvicorn's HTTP protocol lacks against a slow or hostile client: a cap on the size of
a request's head (request line and headers) and a deadline for it.

Without them one client could send headers without end (memory: uvicorn with httptools
holds them all) or hold connections open by sending a head a byte at a time (slowloris:
file descriptors).  A body is the app's to time (``ServerConfig.body_idle_s``).
"""

from __future__ import annotations

import orjson

MAX_HEAD_BYTES = 64 * 1024  # a request line and headers larger than this get 431
HEAD_TIMEOUT_S = 15.0  # a head not complete this long after its first byte gets 408
LINGER_S = 2.0  # after a refusal, how long the rest of the client's bytes are read and dropped

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without its [standard] extras: h11, which caps heads itself
    HttpToolsProtocol = None


def http_settings() -> dict:
    """uvicorn.Config's arguments for the guarded protocol."""
    if HttpToolsProtocol is None:
        return {"http": "h11", "h11_max_incomplete_event_size": MAX_HEAD_BYTES}
    return {"http": GuardedHttpTools}


def _refusal(status: str, message: str) -> bytes:
    body = orjson.dumps({"error": message})
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


if HttpToolsProtocol is not None:

    class GuardedHttpTools(HttpToolsProtocol):
        """httptools' protocol, refusing a head over MAX_HEAD_BYTES (431) or not complete
        HEAD_TIMEOUT_S after it began (408, or a connection that sends nothing: closed)."""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_bytes = 0
            self._in_head = True  # the next bytes are a request's head
            self._dropping = False
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

        def connection_lost(self, exc) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._dropping:  # refused: what still comes is read and dropped
                return
            if self._in_head and self._head_timer is None:  # a keep-alive's next request
                self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)
            counting = self._in_head
            super().data_received(data)
            if counting and self._in_head and not self.transport.is_closing():
                # Checked after parsing: a chunk that completes its head is never refused,
                # however much body it carries.
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._refuse("431 Request Header Fields Too Large",
                                 f"the request line and headers are over "
                                 f"{MAX_HEAD_BYTES // 1024} KiB")

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._stop_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._head_bytes = True, 0

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not self._in_head or self._dropping:
                return
            if self._head_bytes == 0:  # nothing sent (or all of it parsed): no answer
                self.transport.close()
                return
            self._refuse("408 Request Timeout",
                         f"the request's headers did not arrive within {HEAD_TIMEOUT_S:g} s")

        def _refuse(self, status: str, message: str) -> None:
            self._stop_head_timer()
            self.logger.warning("refused a request from %s: %s", self.client, message)
            self.transport.write(_refusal(status, message))
            # Closing with the client's bytes unread would reset the connection, and the
            # client might never read the answer: end our side, read and drop what still
            # comes for a moment (a lingering close, as nginx does), then close.
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self._dropping = True
            self.loop.call_later(LINGER_S, self.transport.close)
