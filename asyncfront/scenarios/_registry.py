"""The registry of runnable scenarios: name -> description, runner and options."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

__all__ = ("SCENARIOS", "SEED_RANGE", "Scenario", "ScenarioReport", "get_scenario")

SEED_RANGE = (0, 2**32 - 1)
"""The seeds a scenario's random pattern takes (those ``random.Random`` treats alike)."""


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
        ranges: each option's allowed values, inclusive (``{"gpus": (1, 2)}``); the
            command line refuses others before running anything.
    """

    name: str
    section: str
    description: str
    runner: Runner
    options: Mapping[str, int] = field(default_factory=dict)
    ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for option, (low, high) in self.ranges.items():
            if option not in self.options:
                raise ValueError(f"scenario {self.name!r}: a range for --{option}, not an option")
            if not low <= self.options[option] <= high:
                raise ValueError(
                    f"scenario {self.name!r}: --{option} defaults to {self.options[option]}, "
                    f"outside its range {low}..{high}"
                )

    def describe_option(self, option: str) -> str:
        """``--depth 1..8, default 8``: the option, its allowed range and its default."""
        low_high = self.ranges.get(option)
        allowed = f"{low_high[0]}..{low_high[1]}" if low_high is not None else "N"
        return f"--{option} {allowed}, default {self.options[option]}"

    def check_options(self, options: Mapping[str, int]) -> None:
        """Refuse options the scenario does not take and values outside their range.

        Raises:
            ValueError: an unknown option (the message names the ones it takes), or a
                value outside the option's range (the message gives the range).
        """
        unknown = sorted(options.keys() - self.options.keys())
        if unknown:
            takes = ", ".join(f"--{k}" for k in self.options) or "no options"
            raise ValueError(f"scenario {self.name!r} takes {takes}, not --{', --'.join(unknown)}")
        for option, value in options.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"scenario {self.name!r}: --{option} must be an integer, not {value!r}"
                )
            low_high = self.ranges.get(option)
            if low_high is not None and not low_high[0] <= value <= low_high[1]:
                raise ValueError(
                    f"scenario {self.name!r}: --{option} must be {low_high[0]}..{low_high[1]}, "
                    f"not {value}"
                )

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
        dit_serving,
        finetune_paging,
        kv_prefetch,
        laptop_voice,
        moe_prefetch,
        moe_routing,
        multi_agent,
        multimedia_request,
        rag_placement,
        sdxl_pressure,
        speculative_decoding,
        streaming_translation,
        tensor_parallel,
        work_stealing,
    )

    scenarios = [
        Scenario(
            "laptop_voice",
            "A",
            "voice-to-chat on a laptop; voice input preempts background embedding",
            laptop_voice.simulate,
            {"utterances": 2},
            {"utterances": (1, laptop_voice.MAX_UTTERANCES)},
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
            {"rounds": (1, speculative_decoding.MAX_ROUNDS), "seed": SEED_RANGE},
        ),
        Scenario(
            "sdxl_pressure",
            "B2",
            "SDXL under memory pressure: weights dropped with a death frontier, then reloaded",
            sdxl_pressure.simulate,
            {},
        ),
        Scenario(
            "finetune_paging",
            "B2c",
            "a fine-tune pages its optimizer state to NVMe and back inside every backward pass",
            finetune_paging.simulate,
            {"steps": finetune_paging.DEFAULT_STEPS},
            {"steps": (1, 1000)},
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
            {"gpus": (1, 2), "depth": (1, streaming_translation.MAX_DEPTH)},
        ),
        Scenario(
            "tensor_parallel",
            "C1",
            "4-way tensor-parallel 70B with all-reduce windows filled by background models",
            tensor_parallel.simulate,
            {"depth": 2},
            {"depth": (1, tensor_parallel.MAX_DEPTH)},
        ),
        Scenario(
            "cross_node_pipeline",
            "C2",
            "a 70B pipeline over two nodes; bubble and throughput per link speed and latency",
            cross_node_pipeline.simulate,
            {"micro_batches": cross_node_pipeline.DEFAULT_MICRO_BATCHES},
            {"micro_batches": (1, 1024)},
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
            {
                "batches": (1, moe_routing.MAX_BATCHES),
                "tokens": (1, moe_routing.MAX_TOKENS),
                "seed": SEED_RANGE,
            },
        ),
        Scenario(
            "multimedia_request",
            "C4",
            "an image + voice request through seven models, submitted atomically",
            multimedia_request.simulate,
            {},
        ),
        Scenario(
            "work_stealing",
            "P5",
            "an irregular workload on a satellite torus: no stealing, neighbour-only, global",
            work_stealing.simulate,
            {"jobs": work_stealing.DEFAULT_JOBS, "seed": work_stealing.DEFAULT_SEED},
            {"jobs": (1, work_stealing.MAX_JOBS), "seed": SEED_RANGE},
        ),
        Scenario(
            "dit_serving",
            "P6",
            "DiT serving: each request's GPUs re-placed between denoising steps vs fixed k",
            dit_serving.simulate,
            {
                "requests": dit_serving.DEFAULT_REQUESTS,
                "seed": dit_serving.DEFAULT_SEED,
                "load": dit_serving.DEFAULT_LOAD,
            },
            {"requests": (1, 1000), "seed": SEED_RANGE, "load": (1, 400)},
        ),
        Scenario(
            "multi_agent",
            "B5",
            "LLM agent workflows with SLOs: priority vs EDF vs SLO-aware arbitration, KV "
            "reserved from predicted output lengths",
            multi_agent.simulate,
            {
                "load": 0,
                "workflows": multi_agent.DEFAULT_WORKFLOWS,
                "seed": multi_agent.DEFAULT_SEED,
            },
            {
                "load": (0, 300),
                "workflows": (1, multi_agent.MAX_WORKFLOWS),
                "seed": SEED_RANGE,
            },
        ),
        Scenario(
            "moe_prefetch",
            "C3b",
            "MoE experts loaded ahead of need from routing foresight, against on-demand loads",
            moe_prefetch.simulate,
            {
                "steps": moe_prefetch.DEFAULT_STEPS,
                "seed": moe_prefetch.DEFAULT_SEED,
                "accuracy": 100,
            },
            {"steps": (1, moe_prefetch.MAX_STEPS), "seed": SEED_RANGE, "accuracy": (0, 100)},
        ),
        Scenario(
            "kv_prefetch",
            "B2d",
            "idle sessions' KV pages brought file -> host -> device before their users return",
            kv_prefetch.simulate,
            {
                "sessions": kv_prefetch.DEFAULT_SESSIONS,
                "messages": kv_prefetch.DEFAULT_MESSAGES,
                "seed": kv_prefetch.DEFAULT_SEED,
            },
            {
                "sessions": (2, kv_prefetch.MAX_SESSIONS),
                "messages": (1, kv_prefetch.MAX_MESSAGES),
                "seed": SEED_RANGE,
            },
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
