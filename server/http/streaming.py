"""Waiting on a request's outputs while watching its connection: a client that goes away ends the wait
at once (the awaited generator is cancelled, so the engine aborts the request and frees its KV memory),
whether it was streaming or waiting for a whole answer."""

import asyncio
import contextlib


class ClientGone(Exception):
    """The client closed the connection."""


async def _disconnected(receive) -> None:
    """Returns when the client has gone (the body is read by then, so nothing else can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_gone(receive, awaitable):
    """awaitable's result (or its error); raises ClientGone, awaitable cancelled, if the client leaves first."""
    work, gone = asyncio.ensure_future(awaitable), asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        gone.cancel()
        raise
    gone.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work          # the work's cleanup (the engine's abort) runs now, not later
        raise ClientGone()
    return work.result()


class EventStream:
    """A server-sent event response (an ASGI app) over an async generator of encoded events. The generator is
    closed as soon as the client goes away, even while it waits for its next event."""

    def __init__(self, events, headers: dict | None = None):
        self.events = events
        self.headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                        "x-accel-buffering": "no", **(headers or {})}

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(k.encode(), v.encode()) for k, v in self.headers.items()]})

        async def pump():
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await until_gone(receive, pump())
        except (ClientGone, OSError):
            pass
        finally:
            await self.events.aclose()
