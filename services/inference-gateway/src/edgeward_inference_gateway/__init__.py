"""Edgeward inference gateway: the relying party that accepts only attested results."""
