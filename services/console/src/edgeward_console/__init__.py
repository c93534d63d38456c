"""Edgeward operator console (issue 16, docs/adr/0031)."""
