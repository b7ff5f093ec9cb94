"""A Starlette server whose requests share one asyncfront runtime, with memory budgets.

The lifespan opens the runtime inside the server's own event loop and admits two
contexts on one CPU device: a Guaranteed ``stt`` context (speech to text) and a
BestEffort ``embed`` context (text embeddings). Every request opens a session on its
model's context, allocates its working memory through the context's budget (waiting
when the budget is spent), runs the model on the context's queue and frees the memory.

The two models are small deterministic stand-ins that do real work on the CPU (NumPy
framing, FFT and band energies with a greedy decoder; a hashing-trick embedding with a
fixed random projection); they are not speech or language models. Swap in real models
by replacing ``transcribe_pcm`` and ``embed_texts`` and their memory estimates.

Endpoints:

- ``POST /transcribe``: body of 16-bit little-endian mono PCM at 16 kHz; returns text.
- ``POST /embed``: JSON ``{"texts": [...]}`` or ``{"text": "..."}``; returns vectors.
- ``GET /stats``: per-context memory use (with the peak), queue and device statistics.

A model that fails answers 500 with a JSON body naming the cause; a request whose
memory cannot be had within its budget answers 503; the server keeps serving. The
``X-Inject-Fault`` header makes a stand-in model raise its value, to show that path.

Run, from the repository root:
    .venv/bin/pip install -q -e '.[server]' && .venv/bin/python examples/server.py [--port 8000]
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import asyncfront as af
from asyncfront.devices import CpuDevice

SAMPLE_RATE = 16_000
FRAME = 400  # 25 ms windows
HOP = 160  # 10 ms hop
BANDS = 40
ALPHABET = " abcdefghijklmnopqrstuvwxyz'"
HASH_BUCKETS = 4096
EMBED_DIM = 256
FAULT_HEADER = "x-inject-fault"


class RequestFailed(Exception):
    """A request that ends in an error: the status and the JSON body to answer with."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body

    @classmethod
    def caused_by(cls, status: int, error: str, model: str, exc: BaseException) -> RequestFailed:
        """A failure of ``model`` whose body names the exception that caused it."""
        cause = f"{type(exc).__name__}: {exc}"
        return cls(status, {"error": error, "model": model, "cause": cause})


# -- the stand-in models (pure functions, run on the device's worker threads) ---------


def transcription_memory(nbytes: int) -> int:
    """Bytes of working memory ``transcribe_pcm`` needs for ``nbytes`` of PCM."""
    samples = nbytes // 2
    frames = max(0, (samples - FRAME) // HOP + 1)
    # float32 samples, framed copy, complex64 spectrum, float32 band energies
    return samples * 4 + frames * (FRAME * 4 + (FRAME // 2 + 1) * 8 + BANDS * 4)


def transcribe_pcm(pcm: bytes, fault: str | None = None) -> dict[str, Any]:
    """Stand-in speech to text: log band energies per frame, then a greedy decoder.

    Each frame's loudest band picks a character (band 0 and quiet frames are blanks),
    and repeats collapse as in CTC greedy decoding. Deterministic for a given input.
    """
    if fault is not None:
        raise RuntimeError(f"injected fault: {fault}")
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    frames = np.lib.stride_tricks.sliding_window_view(audio, FRAME)[::HOP]
    spectrum = np.fft.rfft(frames * np.hanning(FRAME).astype(np.float32), axis=1)
    power = np.abs(spectrum[:, 1:]) ** 2  # drop DC so the bands split evenly
    bands = np.log1p(power.reshape(len(frames), BANDS, -1).sum(axis=2))
    loud = bands.max(axis=1) > 1e-3
    tokens = np.where(loud, bands.argmax(axis=1), 0)
    text = []
    previous = 0
    for token in tokens.tolist():
        if token != previous and token != 0:
            text.append(ALPHABET[token % len(ALPHABET)])
        previous = token
    return {
        "text": "".join(text).strip(),
        "frames": len(frames),
        "seconds": round(len(audio) / SAMPLE_RATE, 3),
    }


def embedding_memory(texts: Sequence[str]) -> int:
    """Bytes of working memory ``embed_texts`` needs for ``texts``."""
    return len(texts) * (HASH_BUCKETS + EMBED_DIM) * 4


def _features(text: str) -> list[str]:
    words = re.findall(r"\w+", text.lower())
    grams = [f"#{w}#"[i : i + 3] for w in words for i in range(len(w))]
    return words + grams


def embed_texts(
    texts: Sequence[str], projection: np.ndarray, fault: str | None = None
) -> list[list[float]]:
    """Stand-in text embedding: hashed words and character trigrams, projected, unit length."""
    if fault is not None:
        raise RuntimeError(f"injected fault: {fault}")
    counts = np.zeros((len(texts), HASH_BUCKETS), dtype=np.float32)
    for row, text in enumerate(texts):
        for feature in _features(text):
            digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest())
            counts[row, digest % HASH_BUCKETS] += 1.0 if digest >> 63 else -1.0
    vectors = np.sign(counts) * np.log1p(np.abs(counts)) @ projection
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms == 0, 1, norms)).round(6).tolist()


# -- the service: the runtime, the contexts and per-request accounting ---------------


@dataclass
class Service:
    """What the lifespan opens: the runtime, one context per model, counters."""

    runtime: af.Runtime
    contexts: dict[str, af.ExecutionContext]
    projection: np.ndarray
    memory_timeout: float
    peaks: dict[str, int] = field(default_factory=dict)
    served: int = 0
    failed: int = 0

    async def run(self, model: str, nbytes: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Allocate ``nbytes`` on ``model``'s context, run ``fn`` on its queue, free.

        Raises:
            RequestFailed: 503 when the memory is not had in time, 500 when ``fn`` raises.
        """
        ctx = self.contexts[model]
        async with self.runtime.session(ctx) as session:
            try:
                buffer = await session.allocate(nbytes, timeout=self.memory_timeout)
            except af.MemoryBudgetError as exc:
                self.failed += 1
                raise RequestFailed.caused_by(503, f"no memory for {model!r}", model, exc) from exc
            # Usage only grows at allocations, so sampling here records the true peak.
            self.peaks[model] = max(self.peaks.get(model, 0), ctx.usage().used)
            try:
                result = await session.run(fn, *args, name=model)
            except Exception as exc:
                self.failed += 1
                raise RequestFailed.caused_by(500, f"model {model!r} failed", model, exc) from exc
            finally:
                session.free(buffer)
        self.served += 1
        return result

    def statistics(self) -> dict[str, Any]:
        """Memory per context (used, limit, peak), queues and the device, as plain data."""
        rt = self.runtime
        contexts = {}
        for name, ctx in self.contexts.items():
            contexts[name] = _plain(ctx.statistics()) | {"peak": self.peaks.get(name, 0)}
        devices = {}
        for device in rt.devices.values():
            devices[device.name] = _plain(device.statistics()) | {
                "memory": device.memory_capacity,
                "available": rt.available_memory(device),
            }
        return {
            "contexts": contexts,
            "queues": {q.name: _plain(q.statistics()) for q in rt.queues},
            "devices": devices,
            "requests": {"served": self.served, "failed": self.failed},
        }


def _plain(snapshot: Any) -> dict[str, Any]:
    return {
        key: value.value if isinstance(value, enum.Enum) else value
        for key, value in dataclasses.asdict(snapshot).items()
    }


async def _failed(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestFailed)
    return JSONResponse(exc.body, status_code=exc.status)


# -- the app -----------------------------------------------------------------------


async def transcribe(request: Request) -> JSONResponse:
    """``POST /transcribe``: 16-bit PCM in, the stand-in model's text out."""
    service: Service = request.state.service
    pcm = await request.body()
    if len(pcm) < FRAME * 2 or len(pcm) % 2:
        error = f"expected 16-bit PCM of at least {FRAME} samples, got {len(pcm)} bytes"
        raise RequestFailed(400, {"error": error})
    fault = request.headers.get(FAULT_HEADER)
    result = await service.run("stt", transcription_memory(len(pcm)), transcribe_pcm, pcm, fault)
    return JSONResponse(result | {"model": "stt (stand-in)"})


async def embed(request: Request) -> JSONResponse:
    """``POST /embed``: ``{"texts": [...]}`` or ``{"text": "..."}`` in, unit vectors out."""
    service: Service = request.state.service
    texts = _texts(await request.body())
    fault = request.headers.get(FAULT_HEADER)
    result = await service.run(
        "embed", embedding_memory(texts), embed_texts, texts, service.projection, fault
    )
    return JSONResponse({"model": "embed (stand-in)", "dim": EMBED_DIM, "embeddings": result})


def _texts(raw: bytes) -> list[str]:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    texts = body.get("texts", [body.get("text")]) if isinstance(body, dict) else None
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise RequestFailed(400, {"error": 'expected {"texts": ["...", ...]} or {"text": "..."}'})
    return texts


async def stats(request: Request) -> JSONResponse:
    """``GET /stats``: the service's memory, queue and request statistics."""
    service: Service = request.state.service
    return JSONResponse(service.statistics())


def create_app(
    *,
    memory: int = 256 * af.MiB,
    stt_memory: int = 128 * af.MiB,
    embed_memory: int = 64 * af.MiB,
    workers: int = 2,
    memory_timeout: float = 30.0,
) -> Starlette:
    """The app: one CPU device of ``memory`` bytes, a Guaranteed and a BestEffort context.

    ``stt_memory`` is reserved for speech to text at start-up; embeddings may use up to
    ``embed_memory`` of what is left. A request waits up to ``memory_timeout`` seconds
    for its working memory before it is answered 503.
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        device = CpuDevice("cpu", workers=workers, memory=memory)
        async with af.open_runtime([device]) as rt:
            contexts = {
                "stt": rt.create_context("stt", device, max_memory=stt_memory),
                "embed": rt.create_context(
                    "embed", device, max_memory=embed_memory, qos=af.QoS.BEST_EFFORT
                ),
            }
            rng = np.random.default_rng(0)
            projection = rng.standard_normal((HASH_BUCKETS, EMBED_DIM), dtype=np.float32)
            yield {"service": Service(rt, contexts, projection, memory_timeout)}

    routes = [
        Route("/transcribe", transcribe, methods=["POST"]),
        Route("/embed", embed, methods=["POST"]),
        Route("/stats", stats, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={RequestFailed: _failed})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--memory-mib", type=int, default=256, help="the CPU device's memory")
    args = parser.parse_args()
    import uvicorn  # only needed to serve; the app itself runs under any ASGI server

    uvicorn.run(create_app(memory=args.memory_mib * af.MiB), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
