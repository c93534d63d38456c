"""Remote log shipping: RFC 5424 syslog over TLS (RFC 5425) from a durable spool.

Modules: :mod:`.rfc5424` (the message and frame, pure), :mod:`.spool` (the SQLite spool),
:mod:`.shipper` (the feeds and the TLS sender). Wiring: ``edgeward_shared.runtime.syslog``.
Decisions: docs/adr/0028.
"""
