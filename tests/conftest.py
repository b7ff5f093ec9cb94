"""Suite-wide fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _structlog_left_unconfigured() -> Iterator[None]:
    """A test that configures structlog (``capture_logs`` does) leaves it as it found it.

    An unconfigured structlog is what makes runtimes log warnings only, to stderr; once
    configured, its defaults print every level to stdout, which later tests would see.
    """
    configured = structlog.is_configured()
    yield
    if not configured and structlog.is_configured():
        structlog.reset_defaults()
