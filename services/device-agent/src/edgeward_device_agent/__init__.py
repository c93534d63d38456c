"""Edgeward device agent: the TPM layer and the simulated-device helper."""
