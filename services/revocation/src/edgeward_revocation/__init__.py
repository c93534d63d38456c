"""Edgeward's revocation service: one place that takes trust away (docs/adr/0010)."""
