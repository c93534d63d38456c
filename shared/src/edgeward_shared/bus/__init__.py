"""The message bus seam: a small interface (:mod:`.base`), the real MQTT implementation over
aiomqtt and mTLS (:mod:`.mqtt`), and an in-memory twin for tests (:mod:`.memory`).

Services see only :class:`~edgeward_shared.bus.base.Bus`; which broker sits behind it is the
wiring's business. The bus moves opaque bytes: signing and verifying is the runtime's job.
"""

from edgeward_shared.bus.base import Bus, Delivery, topic_matches

__all__ = ["Bus", "Delivery", "topic_matches"]
