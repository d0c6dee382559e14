"""Hostile clients for `python -m benchmarks.hostile`, each group run as its own process, so that
they share no interpreter lock with the good client they are measured against. Standard library
only: a process starts in a blink and imports nothing of the project.

    python -m benchmarks.hostile_clients made-up-keys BASE SECONDS SENDERS
        SENDERS connections, each POSTing /predict again as soon as it is answered, with a new
        made-up key (`Bearer insect_<random>`) every time.
    python -m benchmarks.hostile_clients slow-uploads BASE SECONDS CONNECTIONS
        CONNECTIONS connections, each POSTing /app/identify without a session, announcing a 5 MB
        form and sending it a few bytes every 100 ms; a new connection once the server answers.

Each prints one JSON object on stdout: what the server answered.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

BOUNDARY = "insect-hostile"
SLOW_BODY_BYTES = 5_000_000  # what a slow upload announces
TRICKLE_BYTES = 8  # sent every TRICKLE_S
TRICKLE_S = 0.1
NO_ANSWER = "no answer before the end"
CLOSED = "closed without an answer"


@dataclass
class Answer:
    """How the server answered one request."""

    status: str  # its status line ("HTTP/1.1 413 Request Entity Too Large"), CLOSED or NO_ANSWER
    sent: int  # bytes of the body the client had sent when the answer came
    seconds: float  # from connecting to the answer

    @property
    def code(self) -> int | None:
        parts = self.status.split()
        return int(parts[1]) if self.status.startswith("HTTP/") and len(parts) > 1 and parts[1].isdigit() else None


def host_port(base: str) -> tuple[str, int]:
    url = urlsplit(base)
    return url.hostname or "127.0.0.1", url.port or 80


def request_head(base: str, method: str, path: str, headers: dict[str, str]) -> bytes:
    """An HTTP/1.1 request line and headers, up to the blank line before the body."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {urlsplit(base).netloc}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def file_part_head(name: str = "image", filename: str = "bug.jpg") -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'
    return f"--{BOUNDARY}\r\n{disposition}\r\nContent-Type: image/jpeg\r\n\r\n".encode()


async def send_until_answered(
    base: str, head: bytes, chunks: Iterable[bytes], interval_s: float = 0.0, timeout_s: float = 60.0
) -> Answer:
    """Send `head`, then the body's `chunks` `interval_s` apart, until the server answers (its
    status line), closes the connection, or `timeout_s` passes. The answer is read while the body
    is still going out: a server that refuses early is seen refusing early."""
    started = time.monotonic()
    deadline = started + timeout_s
    reader, writer = await asyncio.open_connection(*host_port(base))
    status = asyncio.ensure_future(reader.readline())
    sent = 0
    try:
        writer.write(head)
        for chunk in chunks:
            if status.done() or time.monotonic() > deadline:
                break
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
            # a zero wait still lets the reader run, so an early answer stops the sending
            await asyncio.wait({status}, timeout=interval_s)
        await asyncio.wait({status}, timeout=max(0.0, deadline - time.monotonic()))
    except (ConnectionError, OSError):  # closed under us: an answer may have come before
        await asyncio.wait({status}, timeout=1.0)
    finally:
        writer.close()
    if not status.done():
        status.cancel()
        return Answer(NO_ANSWER, sent, time.monotonic() - started)
    line = b"" if status.exception() else status.result()
    return Answer(line.decode("latin-1").strip() or CLOSED, sent, time.monotonic() - started)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
    """One request on an open connection: (status code, whether the server keeps the connection)."""
    writer.write(request)
    await writer.drain()
    status = await reader.readline()
    if not status:
        raise ConnectionResetError("closed without an answer")
    length, keep = 0, True
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "connection" and value.strip().lower() == "close":
            keep = False
    await reader.readexactly(length)
    return int(status.split()[1]), keep


async def made_up_keys(base: str, seconds: float, senders: int) -> dict:
    """`senders` connections POSTing /predict with a new made-up key each time, for `seconds`."""
    body = file_part_head() + os.urandom(2048) + f"\r\n--{BOUNDARY}--\r\n".encode()
    statuses: Counter[str] = Counter()
    deadline = time.monotonic() + seconds

    async def sender() -> None:
        connection = None
        while time.monotonic() < deadline:
            headers = {
                "Authorization": f"Bearer insect_{secrets.token_urlsafe(32)}",
                "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                "Content-Length": str(len(body)),
            }
            try:
                connection = connection or await asyncio.open_connection(*host_port(base))
                code, keep = await _exchange(*connection, request_head(base, "POST", "/predict", headers) + body)
                statuses[str(code)] += 1
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as error:
                statuses[type(error).__name__] += 1
                keep = False
            if not keep and connection:
                connection[1].close()
                connection = None

    await asyncio.gather(*(sender() for _ in range(senders)))
    return {"requests": sum(statuses.values()), "statuses": dict(statuses)}


async def slow_uploads(base: str, seconds: float, connections: int) -> dict:
    """`connections` slow uploads to /app/identify for `seconds`, each reconnecting once answered."""
    head = request_head(
        base,
        "POST",
        "/app/identify",
        {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Content-Length": str(SLOW_BODY_BYTES)},
    )
    answers: list[Answer] = []
    deadline = time.monotonic() + seconds

    async def uploader() -> None:
        while (left := deadline - time.monotonic()) > 0:
            trickle = itertools.chain([file_part_head()], itertools.repeat(b"\xff" * TRICKLE_BYTES))
            try:
                answer = await send_until_answered(base, head, trickle, TRICKLE_S, left)
            except (ConnectionError, OSError) as error:  # refused at connect: the listen queue is full
                answer = Answer(type(error).__name__, 0, 0.0)
                await asyncio.sleep(TRICKLE_S)
            answers.append(answer)

    await asyncio.gather(*(uploader() for _ in range(connections)))
    return {"uploads": len(answers), "answers": summary(answers)}


def summary(answers: list[Answer]) -> dict[str, dict]:
    """Per status line: how many, and the body bytes sent and seconds waited until the answer."""
    by_status: dict[str, list[Answer]] = {}
    for answer in answers:
        by_status.setdefault(answer.status, []).append(answer)
    return {
        status: {
            "count": len(group),
            "median_sent": statistics.median(a.sent for a in group),
            "max_sent": max(a.sent for a in group),
            "median_s": statistics.median(a.seconds for a in group),
        }
        for status, group in sorted(by_status.items())
    }


CLIENTS = {"made-up-keys": made_up_keys, "slow-uploads": slow_uploads}

if __name__ == "__main__":
    kind, base, seconds, count = sys.argv[1:5]
    print(json.dumps(asyncio.run(CLIENTS[kind](base, float(seconds), int(count)))))
