"""Compatibility layers that offer other schedulers' APIs on top of asyncfront."""

__all__ = ()
