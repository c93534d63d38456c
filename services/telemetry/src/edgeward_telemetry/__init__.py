"""Edgeward telemetry service: fleet health and anomaly detection (docs/telemetry.md)."""
