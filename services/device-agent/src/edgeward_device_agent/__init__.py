"""Edgeward device agent: enrollment and attestation with the device's TPM (``agent``), the
TPM layer (``tpm``) and the simulated-device helper (``swtpm``). Run it with
``python -m edgeward_device_agent`` or ``edgeward-agent``."""
