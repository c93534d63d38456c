"""The telemetry service's reason ids (docs/protocol.md §6)."""

from __future__ import annotations

from typing import Final


class TelemetryReason:
    DEVICE_MISMATCH: Final = "telemetry.report.device_mismatch"
    STALE: Final = "telemetry.report.stale"
    WINDOW: Final = "telemetry.report.window"
    UNATTESTED: Final = "telemetry.unattested"
    RATE_LIMITED: Final = "telemetry.action.rate_limited"
