"""The pytest plugin: a user's suite gets virtual_runtime and fake_device without imports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


def _user_tests() -> str:
    """The example suite of docs/testing.md (its python block that uses the fixtures)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "testing.md").read_text("utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    return next(block for block in blocks if "virtual_runtime" in block)


def test_a_user_suite_using_the_fixtures_passes(pytester: pytest.Pytester) -> None:
    """The documented example suite passes as a user's suite, pytest-asyncio in auto mode."""
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function")
    pytester.makepyfile(test_user=_user_tests())
    result = pytester.runpytest_subprocess("-p", "no:looptime_plugin", "-W", "error")
    result.assert_outcomes(passed=3)


def test_the_documented_suite_passes_as_pasted_with_no_configuration(
    pytester: pytest.Pytester,
) -> None:
    """The docs' example suite, pasted into a project with no pytest config, passes as is."""
    pytester.makepyfile(test_pasted=_user_tests())  # no ini: pytest-asyncio's strict mode
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=3)
    warnings = result.stdout.str().partition("warnings summary")[2]
    assert "asyncfront" not in warnings  # pytest-asyncio may advise on its own settings


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


def test_the_runtime_clock_reads_exact_virtual_times(pytester: pytest.Pytester) -> None:
    """Under the fixture rt.now() reads exactly the virtual time run, 0.1 s steps included."""
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function")
    pytester.makepyfile(
        test_clock="""
async def test_clock(virtual_runtime):
    gpu = virtual_runtime.queue("gpu")
    assert virtual_runtime.now() == 0.0
    seen = []
    for step in range(1, 41):
        await gpu.submit(cost=0.1)
        seen.append((virtual_runtime.now(), step / 10))
    assert all(now == expected for now, expected in seen), seen
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


def test_a_hang_with_a_stalled_queue_names_the_stall(pytester: pytest.Pytester) -> None:
    """A test whose queue waits on a value nothing signals fails naming queue, semaphore, value."""
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function")
    pytester.makepyfile(
        test_stall="""
async def test_stall(virtual_runtime):
    never = virtual_runtime.semaphore(name="never")
    await virtual_runtime.queue("gpu", name="gpu.main").submit(waits=[(never, 3)], name="stuck")
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:looptime_plugin")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*VirtualStallError*gpu.main*stuck*never*3*"])


def test_the_fixture_polls_once_before_each_clock_jump(pytester: pytest.Pytester) -> None:
    """Under the fixture a chain of timers costs one idle I/O poll per jump, as run_virtual."""
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function")
    pytester.makepyfile(
        test_polls="""
import asyncio

async def test_polls(virtual_runtime):
    loop = asyncio.get_running_loop()
    selector = loop._selector
    select = selector.select
    calls = []

    def counting(timeout=None):
        calls.append(timeout)
        return select(timeout)

    selector.select = counting
    try:
        gpu = virtual_runtime.queue("gpu")
        for _ in range(100):
            await gpu.submit(cost=1.0)
    finally:
        selector.select = select
    assert virtual_runtime.now() == 100.0
    # a few polls per step (the loop's own turns plus one idle poll before the jump);
    # looptime's default idles 42 polls before every jump
    assert len(calls) <= 100 * 10, len(calls)
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:looptime_plugin", "-W", "error")
    result.assert_outcomes(passed=1)
