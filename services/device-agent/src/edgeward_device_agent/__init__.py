"""Edgeward device agent: enrollment and attestation with the device's TPM (``agent``), the
TPM layer (``tpm``); the simulated devices are in ``edgeward_device_sim``. Run it with
``python -m edgeward_device_agent`` or ``edgeward-agent``."""
