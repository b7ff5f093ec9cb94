"""Memory shared across models: death-frontier buffer pools, residency and paging."""

__all__ = ()
