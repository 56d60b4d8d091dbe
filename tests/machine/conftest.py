"""Machine-level tests start real machine processes with the e2e ``machine`` fixture."""

from tests.e2e.conftest import machine

__all__ = ["machine"]
