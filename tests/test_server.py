"""examples/server.py: a Starlette app sharing one runtime between two budgeted models."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
asgi_lifespan = pytest.importorskip("asgi_lifespan")

import asyncfront as af  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MiB = af.MiB


@pytest.fixture(scope="module")
def server() -> ModuleType:
    """The example module, imported from its path."""
    name = "asyncfront_example_server"
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def client(server: ModuleType) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app, its lifespan (and so the runtime) open; budgets fit few requests."""
    app = server.create_app(memory=4 * MiB, stt_memory=2 * MiB, embed_memory=1 * MiB)
    async with (
        asgi_lifespan.LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://test"
        ) as client,
    ):
        yield client


def pcm(seconds: float, pitch: float = 440.0) -> bytes:
    """A tone sweeping up from ``pitch`` as 16-bit PCM at 16 kHz."""
    t = np.arange(int(seconds * 16_000)) / 16_000
    wave = np.sin(2 * np.pi * (pitch + 2_000 * t) * t) * 0.5
    return (wave * 32767).astype("<i2").tobytes()


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/stats")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


async def test_concurrent_requests_all_succeed_within_budgets(
    client: httpx.AsyncClient, server: ModuleType
) -> None:
    """Twenty concurrent requests on both models succeed and no budget is ever exceeded."""
    audio = pcm(2.0)
    assert server.transcription_memory(len(audio)) * 10 > 2 * MiB  # they must take turns
    texts = {"texts": [f"request {i}: the quick brown fox" for i in range(40)]}
    responses = await asyncio.gather(
        *(client.post("/transcribe", content=audio) for _ in range(10)),
        *(client.post("/embed", json=texts) for _ in range(10)),
    )
    assert [r.status_code for r in responses] == [200] * 20
    transcripts = {r.json()["text"] for r in responses[:10]}
    assert len(transcripts) == 1 and transcripts != {""}  # deterministic, not empty
    vectors = np.array(responses[10].json()["embeddings"])
    assert vectors.shape == (40, 256)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    report = await stats(client)
    stt, embed = report["contexts"]["stt"], report["contexts"]["embed"]
    assert (stt["qos"], embed["qos"]) == ("guaranteed", "best_effort")
    assert stt["allocations"] == embed["allocations"] == 10
    assert 0 < stt["peak"] <= stt["limit"] == 2 * MiB
    assert 0 < embed["peak"] <= embed["limit"] == 1 * MiB
    assert stt["used"] == embed["used"] == 0 and stt["live_buffers"] == 0
    assert stt["waits"] > 0  # the budget, not luck, kept the peak down
    assert report["requests"] == {"served": 20, "failed": 0}
    assert report["queues"]["stt"]["completed_epoch"] == 10
    assert report["devices"]["cpu"]["memory"] == 4 * MiB


async def test_failing_model_answers_500_with_cause_and_server_keeps_serving(
    client: httpx.AsyncClient,
) -> None:
    """A model that raises gives a 500 naming the cause; its memory is freed; the next succeeds."""
    failed = await client.post(
        "/transcribe", content=pcm(0.5), headers={"X-Inject-Fault": "decoder diverged"}
    )
    assert failed.status_code == 500
    assert failed.json() == {
        "error": "model 'stt' failed",
        "model": "stt",
        "cause": "RuntimeError: injected fault: decoder diverged",
    }
    failed_embed = await client.post(
        "/embed", json={"text": "hello"}, headers={"X-Inject-Fault": "nan"}
    )
    assert failed_embed.status_code == 500 and "nan" in failed_embed.json()["cause"]

    after = await client.post("/transcribe", content=pcm(0.5))
    assert after.status_code == 200 and after.json()["model"] == "stt (stand-in)"
    report = await stats(client)
    assert report["requests"] == {"served": 1, "failed": 2}
    assert report["contexts"]["stt"]["used"] == report["contexts"]["embed"]["used"] == 0


async def test_request_over_its_budget_answers_503(client: httpx.AsyncClient) -> None:
    """Working memory beyond the context's limit is refused with the budget's numbers."""
    response = await client.post("/transcribe", content=pcm(20.0))
    assert response.status_code == 503
    body = response.json()
    assert body["model"] == "stt" and body["cause"].startswith("MemoryBudgetError: ")
    assert (await client.post("/transcribe", content=pcm(0.5))).status_code == 200


@pytest.mark.parametrize(
    ("path", "content"),
    [("/transcribe", b"\x00" * 801), ("/transcribe", b""), ("/embed", b"{}"), ("/embed", b"[")],
)
async def test_malformed_input_answers_400(
    client: httpx.AsyncClient, path: str, content: bytes
) -> None:
    """Bodies the endpoints do not accept get a 400 without reaching a model."""
    response = await client.post(path, content=content)
    assert response.status_code == 400 and "expected" in response.json()["error"]
    assert (await stats(client))["requests"] == {"served": 0, "failed": 0}


async def test_embedding_is_deterministic_and_similar_for_similar_texts(
    client: httpx.AsyncClient,
) -> None:
    """The stand-in embedding maps equal texts to equal vectors and near texts nearby."""
    response = await client.post(
        "/embed", json={"texts": ["the cat sat", "the cat sat", "a cat sat", "zebra quantum"]}
    )
    same, again, near, far = np.array(response.json()["embeddings"])
    np.testing.assert_array_equal(same, again)
    assert same @ near > same @ far
