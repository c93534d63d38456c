"""Edgeward's model-distribution service: model store, rollouts, delivery and key release."""
