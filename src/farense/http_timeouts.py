"""Deadlines for HTTP clients that stall, for `farense serve`: uvicorn's h11 protocol with the two timers it lacks.

uvicorn closes a keep-alive connection left idle after a response (`timeout_keep_alive`), but it waits as long as a
client likes for a request's headers and for its body: a client that connects and sends nothing, or sends headers
and never the body, holds a connection and a task open for good. Here a request has `headers_s` from the start of
the connection (or from its first byte on a reused one) to the end of its headers, and `body_s` from then to the
end of its body; a deadline is not pushed back by each byte, so sending one byte at a time does not extend it.
Past it the client gets 408 and the connection is closed (a connection that sent nothing is closed without a
word, as an idle keep-alive one is).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class StallTimeouts:
    """Seconds a client may take; tests/test_serve_clients.py measures what a stalled client gets."""

    headers_s: float = 10.0
    body_s: float = 10.0
    # Longer than the idle timeouts of the clients' own pools (undici/fetch 4 s, Node's http.Agent and httpx 5 s):
    # the client drops an idle connection first, so it never reuses one the server is closing.
    keep_alive_s: int = 15


class StallTimeoutProtocol(H11Protocol):
    """H11Protocol with a deadline on each request's headers and on its body (`timeouts`, set by `stall_protocol`)."""

    timeouts = StallTimeouts()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._stall: asyncio.TimerHandle | None = None
        self._stall_kind = ""
        super().connection_made(transport)
        self._arm("idle", self.timeouts.headers_s)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE:  # part of a request's headers
            if self._stall_kind == "idle":
                self._stall_kind = "headers"  # same deadline: counted from the connection's start
            elif self._stall_kind != "headers":
                self._arm("headers", self.timeouts.headers_s)
        elif state is h11.SEND_BODY:
            if self._stall_kind != "body":
                self._arm("body", self.timeouts.body_s)
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, kind: str, seconds: float) -> None:
        self._disarm()
        self._stall_kind = kind
        self._stall = self.loop.call_later(seconds, self._expired, seconds)

    def _disarm(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
        self._stall, self._stall_kind = None, ""

    def _expired(self, seconds: float) -> None:
        kind = self._stall_kind  # "idle" may have become "headers" since the timer was set
        self._stall, self._stall_kind = None, ""
        if self.transport.is_closing() or (self.cycle is not None and self.cycle.response_started):
            return  # closing already, or the app answered without waiting for the body (a 413, say)
        if kind != "idle":
            what = "headers" if kind == "headers" else "body"
            body = json.dumps({"status": "error", "error": f"the request {what} did not arrive within {seconds:g} s"})
            head = ("HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
            self.transport.write(head.encode() + body.encode())  # h11 cannot answer a request it has not read
        self.transport.close()  # connection_lost tells the app's receive() the client is gone


def stall_protocol(timeouts: StallTimeouts) -> type[StallTimeoutProtocol]:
    """The protocol class for uvicorn's `http` setting, with these deadlines."""
    return type("StallTimeoutProtocol", (StallTimeoutProtocol,), {"timeouts": timeouts})


def uvicorn_config(app: object, host: str, port: int, timeouts: StallTimeouts = StallTimeouts(),
                   **options: object) -> uvicorn.Config:  # fmt: skip
    """uvicorn's settings for `farense serve`: these deadlines, and uvicorn's own for idle keep-alive connections."""
    return uvicorn.Config(app, host=host, port=port, http=stall_protocol(timeouts),
                          timeout_keep_alive=timeouts.keep_alive_s, **options)  # type: ignore[arg-type]
