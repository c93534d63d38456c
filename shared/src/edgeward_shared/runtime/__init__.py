"""The service runtime every Edgeward process runs: verified routing (:mod:`.core`),
liveness (:mod:`.health`), reconnect backoff, metrics, and wiring from files (:mod:`.node`)."""

from edgeward_shared.runtime.core import Outgoing, Route, Runtime

__all__ = ["Outgoing", "Route", "Runtime"]
