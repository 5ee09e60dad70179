"""loadsvc/ingest/fetch.py: the scraper's HTTP/1.1 GET against a raw asyncio server on 127.0.0.1.

The server answers each request with whatever bytes the test gives it, so every
framing (Content-Length, chunked, end of connection) and every malformed or
oversized answer is exercised; it counts connections to check keep-alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from loadsvc.ingest.fetch import HEADER_LIMIT, Connection, FetchError

PAGE = b'vllm:num_requests_running{engine="0"} 1.0\n' * 100


class RawServer:
    """Answers the n-th request with answers[n] (bytes, or a callable writing to the stream)."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(request)
                answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
                if callable(answer):
                    if await answer(writer):
                        return
                else:
                    writer.write(answer)
                    await writer.drain()
                    if b"Connection: close" in answer or b"Content-Length" not in answer and b"chunked" not in answer:
                        return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/metrics?x=1"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def ok(body: bytes = PAGE, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body


def chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
    out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for c in chunks:
        out += f"{len(c):x};ext=1\r\n".encode() + c + b"\r\n"
    return out + b"0\r\n" + trailer + b"\r\n"


def run(answers: list[Any], calls: Callable[[Connection], Any]) -> tuple[Any, RawServer]:
    server = RawServer(answers)

    async def main() -> Any:
        async with server as url:
            conn = Connection(url)
            try:
                return await calls(conn)
            finally:
                conn.close()

    return asyncio.run(main()), server


def test_content_length_keep_alive_and_the_request_line() -> None:
    async def calls(conn: Connection) -> list[bytes]:
        return [await conn.get(1 << 20) for _ in range(3)]

    bodies, server = run([ok()], calls)
    assert bodies == [PAGE] * 3
    assert server.connections == 1  # kept alive
    assert server.requests[0].startswith(b"GET /metrics?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Accept-Encoding: identity\r\n" in server.requests[0]


def test_chunked_and_close_delimited_bodies() -> None:
    async def calls(conn: Connection) -> list[bytes]:
        return [await conn.get(1 << 20) for _ in range(3)]

    bodies, server = run([chunked(PAGE[:100], PAGE[100:], trailer=b"X-T: 1\r\n"),
                          ok(extra=b"Connection: close\r\n"),
                          b"HTTP/1.0 200 OK\r\n\r\n" + PAGE], calls)
    assert bodies == [PAGE] * 3
    assert server.connections == 2  # Connection: close, then a new one (closed again by HTTP/1.0)


@pytest.mark.parametrize("answer, result, words", [
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno", "http_status", "HTTP 404"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n", "too_large", "2000 bytes, limit 1000"),
    (chunked(b"x" * 600, b"x" * 600), "too_large", "more than 1000 bytes"),
    (b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 1001, "too_large", "more than 1000 bytes"),
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "unreachable", "not an HTTP/1.x answer"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "unreachable", "malformed header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "unreachable", "Content-Length '-5'"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x10\r\n", "unreachable", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcdeXY", "unreachable", "not followed by CRLF"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * HEADER_LIMIT + b"\r\n\r\n", "unreachable", "longer than"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort", "unreachable", "IncompleteReadError"),
])
def test_answers_that_give_no_page(answer: bytes, result: str, words: str) -> None:
    async def calls(conn: Connection) -> FetchError:
        with pytest.raises(FetchError) as e:
            await conn.get(1000)
        return e.value

    async def send_and_close(writer: asyncio.StreamWriter) -> bool:
        writer.write(answer)
        await writer.drain()
        return True

    error, _ = run([send_and_close], calls)
    assert error.result == result
    assert words in str(error)


def test_after_a_failure_the_next_get_opens_a_new_connection() -> None:
    async def drop(writer: asyncio.StreamWriter) -> bool:
        return True  # hang up without answering

    async def calls(conn: Connection) -> tuple[str, bytes]:
        with pytest.raises(FetchError) as e:
            await conn.get(1 << 20)
        return e.value.result, await conn.get(1 << 20)

    (result, body), server = run([drop, ok()], calls)
    assert (result, body) == ("unreachable", PAGE)
    assert server.connections == 2


def test_a_refused_connection_and_a_timeout() -> None:
    async def main() -> tuple[str, bool]:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        with pytest.raises(FetchError) as e:
            await Connection(f"http://127.0.0.1:{port}/metrics").get(1000)

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(5)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        conn = Connection(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await conn.get(1000)
        closed = conn._writer is None  # a timed-out exchange leaves no half-read connection behind
        server.close()
        return e.value.result, closed

    assert asyncio.run(main()) == ("unreachable", True)


def test_urls() -> None:
    conn = Connection("https://[::1]:8443/m")
    assert (conn.host, conn.port, conn.tls) == ("::1", 8443, True)
    assert conn._request.startswith(b"GET /m HTTP/1.1\r\nHost: [::1]:8443\r\n")
    assert (Connection("http://h").port, Connection("http://h")._request[:20]) == (80, b"GET / HTTP/1.1\r\nHost")
    with pytest.raises(ValueError, match="expected an http"):
        Connection("ftp://h/x")
