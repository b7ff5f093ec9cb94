"""Graphs: atomic submission, results, frontiers, failures, definition errors, streaming chains."""

from __future__ import annotations

import gc
import weakref

import pytest

import asyncfront as af
from asyncfront.testing import FakeDevice, run_virtual


def rag_devices() -> list[FakeDevice]:
    return [FakeDevice("cpu", kind="cpu"), FakeDevice("gpu0"), FakeDevice("gpu1")]


def test_every_stage_is_queued_before_any_runs() -> None:
    """submit() queues the whole pipeline at once: nothing has started, no time has passed."""

    async def main() -> None:
        async with af.open_runtime(rag_devices()) as rt:
            g = rt.graph("rag")
            tok = g.stage("tokenize", str.split, "what is a frontier", device="cpu", cost=0.01)
            emb = g.stage("embed", len, tok, device="gpu0", cost=0.05)
            search = g.stage("search", lambda n: [f"doc{i}" for i in range(n)], emb, device="cpu")
            rerank = g.stage("rerank", sorted, search, device="gpu1", cost=0.1, reverse=True)
            g.stage("generate", lambda docs, words: f"{words[-1]}: {docs[0]}", rerank, tok,
                    device="gpu0", cost=0.3)  # fmt: skip
            before = rt.now()
            run = await g.submit()
            assert rt.now() == before
            assert all(s.state is af.SubmissionState.PENDING for s in run.submissions.values())
            assert [q.submitted_epoch for q in rt.queues] == [2, 2, 1]
            results = await run.results()
            assert results == {
                "tokenize": ["what", "is", "a", "frontier"],
                "embed": 4,
                "search": ["doc0", "doc1", "doc2", "doc3"],
                "rerank": ["doc3", "doc2", "doc1", "doc0"],
                "generate": "frontier: doc3",
            }
            assert run.done() and run.sinks == ("generate",)

    run_virtual(main)


def test_final_frontier_carries_the_whole_provenance() -> None:
    """Scenario B3: the answer's frontier names the CPU and both GPUs, and dominates every stage."""

    async def main() -> None:
        async with af.open_runtime(rag_devices()) as rt:
            g = rt.graph("rag")
            tok = g.stage("tokenize", device="cpu", cost=0.01)
            emb = g.stage("embed", device="gpu0", after=[tok], cost=0.05)
            search = g.stage("search", device="cpu", after=[emb], cost=0.02)
            rerank = g.stage("rerank", device="gpu1", after=[search], cost=0.1)
            g.stage("generate", device="gpu0", after=[rerank], cost=0.3)
            run = await g.submit()
            await run.results()
            cpu, gpu0, gpu1 = (rt.default_queue(d) for d in ("cpu", "gpu0", "gpu1"))
            assert run.frontier == af.Frontier({cpu.axis: 2, gpu0.axis: 2, gpu1.axis: 1})
            for sub in run.submissions.values():
                assert sub.frontier is not None and run.frontier >= sub.frontier
            assert run.frontier == run["generate"].frontier

    run_virtual(main)


def test_diamond_frontier_is_the_merge_of_its_branches() -> None:
    """A join stage waits for both branches; the run's frontier merges every sink."""

    async def main() -> None:
        async with af.open_runtime(rag_devices()) as rt:
            g = rt.graph("multimodal")
            audio = g.stage("audio", lambda: "hello", device="cpu", cost=0.1)
            image = g.stage("image", lambda: "cat", device="cpu", cost=0.1)
            text = g.stage("whisper", str.upper, audio, device="gpu0", cost=0.5)
            vision = g.stage("clip", str.title, image, device="gpu1", cost=0.3)
            g.stage("llm", lambda t, v: f"{t} {v}", t=text, v=vision, device="gpu0", cost=1.0)
            g.stage("thumbnail", device="gpu1", after=[vision], cost=0.1)
            run = await g.submit()
            results = await run.results()
            assert results["llm"] == "HELLO Cat"
            assert set(run.sinks) == {"llm", "thumbnail"}
            llm, thumb = run["llm"].frontier, run["thumbnail"].frontier
            assert llm is not None and thumb is not None
            assert llm >= run["whisper"].frontier and llm >= run["clip"].frontier  # type: ignore[operator]
            assert run.frontier == llm | thumb
            assert llm.compare(thumb) is af.Order.CONCURRENT

    run_virtual(main)


def test_failure_fails_dependants_only_and_keeps_partial_results() -> None:
    """A failed stage fails what waits on it; independent branches finish; results() names them."""

    async def main() -> None:
        async with af.open_runtime(rag_devices()) as rt:
            g = rt.graph("rag")
            boom = ValueError("reranker weights missing")

            def rerank(docs: list[str]) -> list[str]:
                raise boom

            search = g.stage("search", lambda: ["a", "b"], device="cpu", cost=0.1)
            ranked = g.stage("rerank", rerank, search, device="gpu1", cost=0.1)
            g.stage("generate", lambda d: d[0], ranked, device="gpu0", cost=0.1)
            g.stage("telemetry", lambda: "logged", device="gpu0", cost=0.5)
            run = await g.submit()
            with pytest.raises(af.GraphError) as caught:
                await run.results()
            error = caught.value
            assert set(error.failed) == {"rerank", "generate"}
            assert error.origins == ("rerank",)
            assert error.causes == {"rerank": boom, "generate": boom}
            assert "stage 'rerank' raised ValueError: reranker weights missing" in str(error)
            assert "'generate'" in str(error)
            generate = run.exceptions()["generate"]
            assert isinstance(generate, af.SemaphoreFailedError) and generate.__cause__ is boom
            assert run.result("search") == ["a", "b"] and run.result("telemetry") == "logged"
            with pytest.raises(ValueError, match="weights missing"):
                run.result("rerank")
            assert run.statistics() == af.GraphRunStatistics("rag#1", 4, 2, 2, 0)
            try:
                await run.results()
            except* ValueError as group:  # an ExceptionGroup: except* picks the origin
                assert group.exceptions == (boom,)
            except* af.SemaphoreFailedError:
                pass

    run_virtual(main)


def test_qos_sets_the_default_queue_priority_and_queues_are_shared() -> None:
    """Stages run on the runtime's (device, priority) queues; runs reuse them, adding no axes."""

    async def main() -> None:
        async with af.open_runtime(rag_devices()) as rt:
            g = rt.graph("chat", qos=af.QoS.BURSTABLE)
            g.stage("prefill", device="gpu0", cost=0.1)
            g.stage("index", device="gpu0", cost=0.1, qos=af.QoS.BEST_EFFORT)
            first = await g.submit()
            second = await g.submit()
            await first.results()
            await second.results()
            assert first["prefill"].queue is rt.default_queue("gpu0", af.QoS.BURSTABLE.priority)
            assert first["prefill"].queue.priority == 10
            assert first["index"].queue.priority == 0
            assert second["prefill"].queue is first["prefill"].queue
            assert len(rt.queues) == 2
            assert (first.name, second.name) == ("chat#1", "chat#2")

    run_virtual(main)


def test_an_explicit_queue_and_a_coroutine_stage() -> None:
    """A stage may name a queue (a context's, say) and run a coroutine function."""

    async def main() -> None:
        async with af.open_runtime(rag_devices()) as rt:
            ctx = rt.create_context("llm", device="gpu0")
            g = rt.graph("g")

            async def fetch() -> str:
                return "context"

            source = g.stage("fetch", fetch, device="cpu")
            g.stage("answer", lambda c: f"answer with {c}", source, device=ctx.queue, cost=0.2)
            run = await g.submit()
            assert (await run.results())["answer"] == "answer with context"
            assert run["answer"].queue is ctx.queue
            with pytest.raises(ValueError, match="qos"):
                g.stage("bad", device=ctx.queue, qos=af.QoS.GUARANTEED)

    run_virtual(main)


def test_stage_on_a_collective_channel() -> None:
    """Scenario C4: a tensor-parallel stage is one channel step: one entry for four GPUs."""

    async def main() -> None:
        devices = [FakeDevice("cpu", kind="cpu"), *(FakeDevice(f"gpu{i}") for i in range(4))]
        async with af.open_runtime(devices) as rt:
            members = [rt.queue(f"gpu{i}") for i in range(4)]
            tp = rt.collective(members, name="tp")
            g = rt.graph("request")
            text = g.stage("whisper", lambda: "a cat", device="cpu", cost=0.1)
            llm = g.stage("llama70b", lambda rank, t: f"{rank}:{t}", text, device=tp, cost=1.0)
            g.stage("respond", lambda shards: shards[0], llm, device="cpu", cost=0.1)
            run = await g.submit()
            results = await run.results()
            assert results["llama70b"] == ["0:a cat", "1:a cat", "2:a cat", "3:a cat"]
            assert results["respond"] == "0:a cat"
            cpu = rt.default_queue("cpu")
            assert run.frontier == af.Frontier({cpu.axis: 2, tp.axis: 1})
            assert not any(q.axis in run.frontier for q in members)

    run_virtual(main)


def test_trace_shows_graph_stages() -> None:
    """Every stage's trace event carries the graph, run and stage names in its args."""

    async def main() -> af.Runtime:
        async with af.open_runtime(rag_devices()) as rt:
            g = rt.graph("rag")
            g.stage("embed", device="gpu0", cost=0.1)
            await (await g.submit()).results()
        return rt

    rt = run_virtual(main)
    events = [e for e in rt.trace.to_perfetto()["traceEvents"] if e.get("name") == "embed"]
    assert events[0]["args"]["graph"] == "rag"
    assert events[0]["args"]["run"] == "rag#1" and events[0]["args"]["stage"] == "embed"


def test_empty_graph() -> None:
    """An empty graph submits to a run with no results and an empty frontier."""

    async def main() -> None:
        async with af.open_runtime(rag_devices()) as rt:
            run = await rt.graph("empty").submit()
            assert await run.results() == {} and run.frontier == af.Frontier()

    run_virtual(main)


# -- definition errors -------------------------------------------------------------------


def test_definition_errors_are_raised_at_once() -> None:
    """Duplicate names, unknown stages, foreign stages and unknown devices fail at definition."""

    async def main() -> None:
        async with af.open_runtime(rag_devices()) as rt:
            g, other = rt.graph("g"), rt.graph("other")
            a = g.stage("a", device="cpu")
            with pytest.raises(af.GraphDefinitionError, match="already has a stage named 'a'"):
                g.stage("a")
            with pytest.raises(af.GraphDefinitionError, match="no stage named 'missing'"):
                g.stage("b", after=["missing"])
            with pytest.raises(af.GraphDefinitionError, match="belongs to graph 'g'"):
                other.stage("c", after=[a])
            with pytest.raises(KeyError, match="no device named 'tpu'"):
                g.stage("d", device="tpu")
            with pytest.raises(ValueError, match="cost"):
                g.stage("e", cost=-1)
            with pytest.raises(TypeError, match="waits"):
                g.stage("f", waits=[])
            assert g.stage("g", after=a).after == (a,)  # one stage needs no list
            assert [s.name for s in g.stages] == ["a", "g"]

    run_virtual(main)


def test_cycles_are_refused() -> None:
    """add_dependency refuses an edge that would close a cycle, naming the path."""

    async def main() -> None:
        async with af.open_runtime(rag_devices()) as rt:
            g = rt.graph("g")
            a = g.stage("a")
            b = g.stage("b", after=[a])
            c = g.stage("c", after=[b])
            with pytest.raises(af.GraphDefinitionError, match="cycle") as caught:
                g.add_dependency(a, c)
            assert "a -> c -> b -> a" in str(caught.value)
            with pytest.raises(af.GraphDefinitionError, match="cycle"):
                g.add_dependency("a", "a")
            d = g.stage("d")
            g.add_dependency(d, c)  # a new edge that closes nothing is fine
            assert [s.name for s in g.order()] == ["a", "b", "c", "d"]

    run_virtual(main)


# -- streaming chains --------------------------------------------------------------------


def babelfish_devices() -> list[FakeDevice]:
    return [*rag_devices(), FakeDevice("speaker", kind="audio")]


TICKS = {"vad": 1.0, "encode": 2.0, "decode": 2.0, "translate": 3.0, "tts": 2.0, "playback": 1.0}


def babelfish(rt: af.Runtime, chunks: int) -> tuple[af.Graph, af.StageChain, list[str]]:
    """Scenario B4: VAD on the CPU, encode/decode on gpu1, translate/TTS on gpu0, then playback."""
    heard: list[str] = []
    g = rt.graph("babelfish")
    vad = g.stage("vad", lambda k: f"chunk{k}", af.ITERATION, device="cpu", cost=TICKS["vad"])
    enc = g.stage("encode", lambda a: f"latent({a})", vad, device="gpu1", cost=TICKS["encode"])
    dec = g.stage("decode", lambda z: f"src({z})", enc, device="gpu1", cost=TICKS["decode"])
    tr = g.stage("translate", lambda s: f"tgt({s})", dec, device="gpu0", cost=TICKS["translate"])
    tts = g.stage("tts", lambda t: f"wav({t})", tr, device="gpu0", cost=TICKS["tts"])
    play = g.stage("playback", heard.append, tts, device="speaker", cost=TICKS["playback"])
    chain = g.chain(play, iterations=chunks, skip=[dec, tts], through=dec)
    return g, chain, heard


def test_chain_replicates_the_subgraph_with_skip_and_through_edges() -> None:
    """Copies are named name[k]; skip stages wait on their previous iteration; VAD on decode."""

    async def main() -> None:
        async with af.open_runtime(babelfish_devices()) as rt:
            g, chain, _ = babelfish(rt, 3)
            assert len(g) == 18 and len(chain) == 3
            assert [s.name for s in chain] == ["playback[0]", "playback[1]", "playback[2]"]
            it1 = chain.iteration(1)
            assert [s.name for s in it1["decode"].after] == ["encode[1]", "decode[0]"]
            assert [s.name for s in it1["tts"].after] == ["translate[1]", "tts[0]"]
            assert [s.name for s in it1["vad"].after] == ["decode[0]"]
            assert [s.name for s in chain.iteration(0)["vad"].after] == []
            assert [s.name for s in it1["translate"].after] == ["decode[1]"]
            assert g["playback"] is chain[2]  # the original name now means the last iteration

    run_virtual(main)


def test_streaming_translation_overlaps_chunks_and_carries_state() -> None:
    """Scenario B4: encode of chunk k+1 overlaps translation of chunk k; skip frontiers dominate."""

    async def main() -> None:
        async with af.open_runtime(babelfish_devices()) as rt:
            g, _, heard = babelfish(rt, 4)
            run = await g.submit()
            await run.results()
            assert heard == [f"wav(tgt(src(latent(chunk{k}))))" for k in range(4)]

            def sub(name: str, k: int) -> af.Submission:
                handle = run[f"{name}[{k}]"]
                assert isinstance(handle, af.Submission)
                return handle

            for k in range(3):
                for stateful in ("decode", "tts"):
                    now, nxt = sub(stateful, k).frontier, sub(stateful, k + 1).frontier
                    assert now is not None and nxt is not None and nxt > now
                assert sub("vad", k + 1).started_at >= sub("decode", k).finished_at  # type: ignore[operator]
            # two GPUs: chunk 1 is encoded while chunk 0 is being translated
            assert sub("encode", 1).started_at < sub("translate", 0).finished_at  # type: ignore[operator]
            # chunks start every VAD + encode + decode = 5 ticks
            assert [sub("vad", k).started_at for k in range(4)] == [0.0, 5.0, 10.0, 15.0]
            assert run.frontier == sub("playback", 3).frontier

    run_virtual(main)


def test_chain_without_cross_iteration_edges_and_outside_dependants() -> None:
    """Plain replication: iterations are independent; a stage after the chain waits on the last."""

    async def main() -> None:
        async with af.open_runtime(rag_devices()) as rt:
            g = rt.graph("batch")
            embed = g.stage("embed", lambda k: k * k, af.ITERATION, device="gpu0", cost=1.0)
            total = g.stage("count", lambda last: last, embed, device="cpu")
            chain = g.chain(embed, iterations=3)
            assert [s.name for s in total.after] == ["embed[2]"]
            run = await g.submit()
            results = await run.results()
            assert [results[f"embed[{k}]"] for k in range(3)] == [0, 1, 4]
            assert results["count"] == 4
            assert all(not chain[k].after for k in range(3))

    run_virtual(main)


def test_chain_errors() -> None:
    """skip and through must lie in the chained subgraph; copies may not clash with names."""

    async def main() -> None:
        async with af.open_runtime(rag_devices()) as rt:
            g = rt.graph("g")
            a = g.stage("a")
            b = g.stage("b", after=[a])
            side = g.stage("side")
            with pytest.raises(af.GraphDefinitionError, match="not part of the subgraph"):
                g.chain(b, iterations=2, skip=[side])
            with pytest.raises(af.GraphDefinitionError, match="not part of the subgraph"):
                g.chain(b, iterations=2, through=side)
            with pytest.raises(ValueError, match="iterations"):
                g.chain(b, iterations=0)
            g.stage("a[1]")
            with pytest.raises(af.GraphDefinitionError, match="'a\\[1\\]'"):
                g.chain(b, iterations=2)
            assert set(g._stages) == {"a", "b", "side", "a[1]"}  # failed chains change nothing

    run_virtual(main)


def test_a_kept_stage_error_does_not_keep_its_run_alive() -> None:
    """Waiting for a run gives no stage error a traceback: holding the error pins no run."""

    async def main() -> None:
        async with af.open_runtime([FakeDevice("gpu")]) as rt:
            g = rt.graph("g")

            def broken() -> None:
                raise RuntimeError("stage broke")

            g.stage("first", lambda: 1, device="gpu", cost=0.1)
            g.stage("second", broken, device="gpu", cost=0.2)
            run = await g.submit()
            await run.wait()
            error = run.exceptions()["second"]
            alive = weakref.ref(run)
            del run, g
            gc.collect()  # the handles are freed; only a traceback could still hold the run
            assert alive() is None
            assert isinstance(error, RuntimeError)

    run_virtual(main)
