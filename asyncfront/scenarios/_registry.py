"""The registry of runnable scenarios: name -> description, runner and options."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

__all__ = ("SCENARIOS", "Scenario", "ScenarioReport", "get_scenario")


class ScenarioReport(Protocol):
    """What every scenario's ``simulate`` returns first: a report that can describe itself."""

    def describe(self) -> str:
        """A human-readable summary of what the simulation showed."""
        ...


Runner = Callable[..., Awaitable[tuple[ScenarioReport, str]]]


@dataclass(frozen=True)
class Scenario:
    """One runnable scenario.

    Attributes:
        name: what ``python -m asyncfront simulate NAME`` calls it.
        section: the hardware configuration and scenario number (``"B4"``).
        description: one line on what it shows.
        runner: ``simulate(**options, trace_path=...)``, an async function returning the
            report and a text timeline (run it under a virtual-time loop).
        options: the options it takes (``gpus``, ``depth``) with their defaults.
    """

    name: str
    section: str
    description: str
    runner: Runner
    options: Mapping[str, int] = field(default_factory=dict)

    def check_options(self, options: Mapping[str, int]) -> None:
        """Refuse options the scenario does not take.

        Raises:
            ValueError: an unknown option (the message names the ones it takes).
        """
        unknown = sorted(options.keys() - self.options.keys())
        if unknown:
            takes = ", ".join(f"--{k}" for k in self.options) or "no options"
            raise ValueError(f"scenario {self.name!r} takes {takes}, not --{', --'.join(unknown)}")

    async def simulate(
        self, *, trace_path: str | None = None, **options: int
    ) -> tuple[ScenarioReport, str]:
        """Run the scenario with ``options`` (each one it takes); returns report and timeline.

        Raises:
            ValueError: an option the scenario does not take.
        """
        self.check_options(options)
        return await self.runner(trace_path=trace_path, **options)


def _registry() -> dict[str, Scenario]:
    from . import (
        cross_node_pipeline,
        laptop_voice,
        moe_routing,
        multimedia_request,
        rag_placement,
        sdxl_pressure,
        speculative_decoding,
        streaming_translation,
        tensor_parallel,
    )

    scenarios = [
        Scenario(
            "laptop_voice",
            "A",
            "voice-to-chat on a laptop; voice input preempts background embedding",
            laptop_voice.simulate,
            {},
        ),
        Scenario(
            "speculative_decoding",
            "B1",
            "draft round k+1 overlaps verify round k; a rejection invalidates the later draft",
            speculative_decoding.simulate,
            {
                "rounds": speculative_decoding.DEFAULT_ROUNDS,
                "seed": speculative_decoding.DEFAULT_SEED,
            },
        ),
        Scenario(
            "sdxl_pressure",
            "B2",
            "SDXL under memory pressure: weights dropped with a death frontier, then reloaded",
            sdxl_pressure.simulate,
            {},
        ),
        Scenario(
            "rag_placement",
            "B3",
            "a RAG query placed by weight residency; the reranker falls back to the CPU",
            rag_placement.simulate,
            {},
        ),
        Scenario(
            "streaming_translation",
            "B4",
            "six-stage streaming translation with decoder and TTS skip edges",
            streaming_translation.simulate,
            {"gpus": 2, "depth": streaming_translation.MAX_DEPTH},
        ),
        Scenario(
            "tensor_parallel",
            "C1",
            "4-way tensor-parallel 70B with all-reduce windows filled by background models",
            tensor_parallel.simulate,
            {"depth": 2},
        ),
        Scenario(
            "cross_node_pipeline",
            "C2",
            "a 70B pipeline over two nodes; bubble and throughput per link speed and latency",
            cross_node_pipeline.simulate,
            {"micro_batches": cross_node_pipeline.DEFAULT_MICRO_BATCHES},
        ),
        Scenario(
            "moe_routing",
            "C3",
            "Mixtral experts routed per batch; cold experts load from NVMe and stay resident",
            moe_routing.simulate,
            {
                "batches": moe_routing.DEFAULT_BATCHES,
                "tokens": moe_routing.DEFAULT_TOKENS,
                "seed": moe_routing.DEFAULT_SEED,
            },
        ),
        Scenario(
            "multimedia_request",
            "C4",
            "an image + voice request through seven models, submitted atomically",
            multimedia_request.simulate,
            {},
        ),
    ]
    return {s.name: s for s in scenarios}


SCENARIOS: Mapping[str, Scenario] = MappingProxyType(_registry())
"""Every runnable scenario by name, in document order."""


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name``.

    Raises:
        KeyError: no such scenario (the message lists them).
    """
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(f"no scenario named {name!r}; scenarios: {', '.join(SCENARIOS)}") from None
