"""The service runtime every Edgeward process runs: verified routing (:mod:`.core`),
liveness (:mod:`.health`), reconnect backoff, metrics, wiring from files (:mod:`.node`), and
the one command-line shape of every entry point (:mod:`.kit`, :mod:`.params`)."""

from edgeward_shared.runtime.core import Outgoing, Route, Runtime

__all__ = ["Outgoing", "Route", "Runtime"]
