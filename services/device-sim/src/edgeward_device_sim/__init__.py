"""Edgeward device simulation, for development, tests, benchmarks and the demo (never for
production): simulated TPMs (``swtpm``: one swtpm process per device, provisioned with an EK
certificate from a test manufacturer CA, booted with a golden or tampered chain), the TCG
event log of that simulated boot (``tcg_log``), and the ``edgeward-swtpm`` command
(``simulate``). No production package imports it (import contract
``production-imports-no-simulation``, docs/adr/0027)."""
