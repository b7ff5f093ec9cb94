"""The pytest plugin: a user's suite gets virtual_runtime and fake_device without imports."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = """
import asyncio

import pytest

import asyncfront as af


async def test_pipeline_runs_in_virtual_time(virtual_runtime):
    rt = virtual_runtime
    features = af.TimelineSemaphore(name="features")
    pre = rt.queue("cpu", name="pre").submit(name="pre", cost=0.5, signals=[(features, 1)])
    llm = rt.queue("gpu", name="llm").submit(
        lambda: "reply", name="generate", cost=2.0, waits=[(features, 1)]
    )
    assert await llm == "reply"
    assert rt.now() == pytest.approx(2.5)  # 0.5 s of preprocessing, then 2 s of generation
    assert llm.started_at - pre.started_at == pytest.approx(0.5)
    assert llm.frontier.get(pre.queue.axis) == 1
    await asyncio.sleep(3600)  # an hour of loop time, no wall time
    assert rt.now() == pytest.approx(3602.5)


def test_fake_device_factory(fake_device):
    a, b = fake_device(), fake_device("npu", kind="npu", speed=2.0)
    assert a.name != b.name and b.kind == "npu" and b.speed == 2.0


class TestTwoGpus:
    @pytest.fixture
    def virtual_runtime_devices(self, fake_device):
        return [fake_device("gpu0", memory=1 << 30), fake_device("gpu1", memory=1 << 30)]

    async def test_devices_are_chosen_by_overriding_a_fixture(self, virtual_runtime):
        assert sorted(virtual_runtime.devices) == ["gpu0", "gpu1"]
"""


def test_a_user_suite_using_the_fixtures_passes(pytester: pytest.Pytester) -> None:
    """The fixtures work in a fresh suite with pytest-asyncio in auto mode."""
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function")
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:looptime_plugin", "-W", "error")
    result.assert_outcomes(passed=3)


def test_the_fixture_works_in_strict_mode_with_the_marker(pytester: pytest.Pytester) -> None:
    """In pytest-asyncio's strict mode an asyncio-marked test gets the runtime too."""
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function"
    )
    pytester.makepyfile(
        test_strict="""
import pytest

@pytest.mark.asyncio
async def test_now_starts_at_zero(virtual_runtime):
    assert virtual_runtime.now() == 0.0
    await virtual_runtime.queue("gpu").submit(cost=5.0)
    assert virtual_runtime.now() == 5.0
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:looptime_plugin", "-W", "error")
    result.assert_outcomes(passed=1)


def test_a_hang_fails_fast_instead_of_timing_out(pytester: pytest.Pytester) -> None:
    """Waiting on something nothing will signal fails after a second of idleness."""
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function")
    pytester.makepyfile(
        test_hang="""
import asyncio
import looptime

async def test_hang(virtual_runtime):
    try:
        await asyncio.get_running_loop().create_future()
    except looptime.IdleTimeoutError:
        return
    raise AssertionError("expected an idle timeout")
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:looptime_plugin")
    result.assert_outcomes(passed=1)
