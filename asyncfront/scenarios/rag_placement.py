"""Scenario B3: a RAG query placed by weight residency on a two-GPU workstation, in virtual time.

Each query is one :class:`~asyncfront.Graph`: tokenize on the CPU, embed the query
(BGE), vector search on the CPU, rerank the candidates (a cross-encoder), generate the
answer (Llama-3-8B). The model stages carry no device: placement puts each where its
weights are resident. Warm, the query bounces CPU -> GPU 0 -> CPU -> GPU 1 -> GPU 0 and
the answer's frontier holds the axes of all three compute devices.

Then SDXL takes GPU 1 (50 UNet steps queued) and the reranker's weights there are
dropped. The rerank is placed with :meth:`~asyncfront.Runtime.place` before its query is
built, because a non-resident choice needs a load stage in front of it:

- with a tight deadline nothing can finish in time, so the rerank falls back to the CPU
  (rule 4); GPU 1's axis does not advance;
- with a looser deadline the CPU (where host memory keeps the weights) is still too
  slow, but loading the weights into GPU 0 and reranking there meets it: the cheapest
  choice that does (rule 3). The query gains a load stage on the NVMe queue, and the
  answer's frontier carries the storage axis.

Numbers chosen: the CPU runs model work ten times slower than a GPU (``speed`` 0.1).
Seconds on the device that runs them: tokenize 2 ms (CPU), embed 10 ms, vector search
5 ms (CPU), rerank 30 ms on a GPU (300 ms on the CPU), generate 1 s (about 250 tokens),
an SDXL step 100 ms. Loading the 1 GiB reranker takes 0.2 s (7 GB/s NVMe read plus the
copy). Deadlines for the rerank: 0.2 s (tight) and 0.25 s (loose), against
estimates of 0.3 s on the CPU and 0.23 s for load + rerank on GPU 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._budget import GiB, MiB
from .._frontier import Frontier, axis_name
from .._graph import GraphRun
from .._placement import PlacementDecision
from .._queue import Submission
from .._runtime import Runtime, open_runtime
from ..devices.fake import FakeDevice

__all__ = (
    "CPU_SPEED",
    "DEADLINES",
    "RERANKER_LOAD_TIME",
    "SECONDS",
    "RagQuery",
    "RagReport",
    "rag_devices",
    "run_rag_placement",
    "simulate",
)

CPU_SPEED = 0.1
"""The CPU's speed relative to a GPU for model work."""
SECONDS = {
    "tokenize": 0.002,  # CPU
    "embed": 0.010,  # GPU: BGE-large, one query
    "search": 0.005,  # CPU: vector index lookup
    "rerank": 0.030,  # GPU: cross-encoder over the candidates (0.3 s on the CPU)
    "generate": 1.0,  # GPU: Llama-3-8B answer, about 250 tokens
    "sdxl_step": 0.100,  # GPU: one UNet step
}
"""Seconds per stage on the device that runs it (model stages: on a GPU)."""
RERANKER_LOAD_TIME = 0.2
"""Seconds to load the reranker's 1 GiB of weights from NVMe into a GPU."""
DEADLINES = {"tight": 0.2, "loose": 0.25}
"""Deadlines of the rerank in the queries after SDXL took GPU 1, in seconds."""
SDXL_STEPS = 50


def rag_devices() -> list[FakeDevice]:
    """The workstation: a CPU (NUMA domain 0), two 24 GiB GPUs and the NVMe array."""
    return [
        FakeDevice("cpu", kind="cpu", speed=CPU_SPEED),
        FakeDevice("gpu0", memory=24 * GiB),
        FakeDevice("gpu1", memory=24 * GiB),
        FakeDevice("nvme", kind="storage"),
    ]


@dataclass
class RagQuery:
    """One query: its run, where the rerank went and why."""

    label: str
    answer: str
    run: GraphRun
    rerank: PlacementDecision

    def device_of(self, stage: str) -> str:
        """The device the stage ran on."""
        sub = self.run[stage]
        assert isinstance(sub, Submission)
        return sub.queue.device.name

    @property
    def path(self) -> list[str]:
        """The devices of the compute stages, in pipeline order."""
        return [self.device_of(s) for s in ("tokenize", "embed", "search", "rerank", "generate")]

    @property
    def frontier(self) -> Frontier:
        """The answer's frontier."""
        return self.run.frontier


@dataclass
class RagReport:
    """The three queries and the axes that matter."""

    queries: dict[str, RagQuery]
    axes: dict[str, int] = field(default_factory=dict)  # device -> its default queue's axis

    def describe(self) -> str:
        """Each query's path, the rerank's placement and the answer's frontier."""
        lines = []
        for q in self.queries.values():
            lines.append(f"query {q.label}: {' -> '.join(q.path)}")
            lines.append(
                f"  rerank on {q.rerank.device} ({q.rerank.reason.value}), estimates "
                + ", ".join(f"{d}={t:.3f}s" for d, t in q.rerank.estimates.items())
            )
            names = ", ".join(f"{axis_name(a)}={e}" for a, e in q.frontier)
            lines.append(f"  answer frontier: {{{names}}}")
        return "\n".join(lines)


async def _query(rt: Runtime, label: str, deadline: float | None) -> RagQuery:
    """Build, submit and finish one RAG query; the rerank is placed up front."""
    rerank_at = rt.place("reranker", cost=SECONDS["rerank"], deadline=deadline)
    g = rt.graph(f"rag-{label}")
    cpu_cost = SECONDS["tokenize"] * CPU_SPEED
    tok = g.stage("tokenize", str.split, "what is a frontier", device="cpu", cost=cpu_cost)
    emb = g.stage("embed", len, tok, model="bge", cost=SECONDS["embed"])
    docs = g.stage(
        "search",
        lambda n: [f"doc{i}" for i in range(n)],
        emb,
        device="cpu",
        cost=SECONDS["search"] * CPU_SPEED,
    )
    after = []
    if not rt.is_resident("reranker", rerank_at.device):
        target = rerank_at.device
        after.append(
            g.stage(
                "load_reranker",
                lambda: rt.declare_resident("reranker", target),
                device="nvme",
                cost=RERANKER_LOAD_TIME,
            )
        )
    top = g.stage(
        "rerank",
        sorted,
        docs,
        reverse=True,
        device=rerank_at.device,
        after=after,
        cost=SECONDS["rerank"],
    )
    g.stage(
        "generate",
        lambda d, words: f"{words[-1]}? see {d[0]}",
        top,
        tok,
        model="llama",
        cost=SECONDS["generate"],
    )
    run = await g.submit()
    results = await run.results()
    return RagQuery(label, results["generate"], run, rerank_at)


async def run_rag_placement(rt: Runtime) -> RagReport:
    """Run a warm query, then SDXL on GPU 1, then a tight and a loose query."""
    rt.declare_model("bge", 512 * MiB, resident_on=["gpu0"])
    # Host memory keeps a copy of the reranker's read-only weights: the CPU can always run it.
    rt.declare_model("reranker", GiB, resident_on=["gpu1", "cpu"], load_time=RERANKER_LOAD_TIME)
    rt.declare_model("llama", 5 * GiB, resident_on=["gpu0"])
    queries = {"warm": await _query(rt, "warm", None)}
    # SDXL needs GPU 1's memory: the reranker's weights there are dropped.
    rt.declare_resident("reranker", "gpu1", resident=False)
    sdxl = rt.queue("gpu1", name="gpu1.sdxl")
    for _ in range(SDXL_STEPS):
        sdxl.submit(name="unet", cost=SECONDS["sdxl_step"])
    for label, deadline in DEADLINES.items():
        queries[label] = await _query(rt, label, deadline)
    axes = {d: rt.default_queue(d).axis for d in ("cpu", "gpu0", "gpu1")}
    axes["nvme"] = rt.default_queue("nvme").axis
    axes["sdxl"] = sdxl.axis
    return RagReport(queries, axes)


async def simulate(*, trace_path: str | None = None) -> tuple[RagReport, str]:
    """Open a runtime on the workstation's fake devices, run B3, return report and timeline.

    Writes a Perfetto trace to ``trace_path`` when given.
    """
    async with open_runtime(rag_devices()) as rt:
        report = await run_rag_placement(rt)
    if trace_path is not None:
        rt.trace.export_perfetto(trace_path)
    return report, rt.trace.format_timeline()
