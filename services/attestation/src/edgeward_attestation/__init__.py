"""Edgeward attestation service: pure verification cores (quotes, credential protection)."""
