"""Reason ids the gateway adds to :class:`~edgeward_shared.inference.InferenceReason`.

Every accept or reject decision of the gateway carries one reason id (labels in
``edgeward_gateway_results_total``, the ``reason`` of an :class:`InferAnswer` or a
``RejectedResult`` event, and the rejection counts in the database). The ids shared with
devices live in ``edgeward_shared.inference``; these are the gateway's own.
"""

from __future__ import annotations

from typing import Final

from edgeward_shared.inference import InferenceReason


class GatewayReason:
    ACCEPTED: Final = "infer.result.accepted"
    #: an answer names no call this gateway is waiting for (unknown, answered or timed out)
    REQUEST_UNKNOWN: Final = "infer.request.unknown"
    #: an answer's body does not match the call (request mid, model, version, source)
    REQUEST_MISMATCH: Final = "infer.request.mismatch"
    #: an answer was computed on other inputs than the caller sent
    INPUT_MISMATCH: Final = "infer.input.mismatch"
    #: the body's model digest is not the published digest of that version
    MODEL_DIGEST: Final = "infer.model.digest_mismatch"
    #: the model-distribution service did not answer: fail closed
    MODELS_UNAVAILABLE: Final = "infer.models.unavailable"
    #: a call naming the caller it is made for (on_behalf_of), from anyone but the gateway
    CALLER_FORBIDDEN: Final = "infer.caller.forbidden"
    #: a call naming no device: no attested device is known to run the model (routing)
    NO_DEVICE: Final = "infer.route.no_device"


#: Reason ids that come from devices and go back to callers unchanged.
DEVICE_REFUSALS: Final = frozenset(
    {
        InferenceReason.RATE_LIMITED,
        InferenceReason.STOPPED,
        InferenceReason.NO_MODEL,
        InferenceReason.INPUT_INVALID,
        InferenceReason.WORKER_FAILED,
        InferenceReason.NOT_ATTESTED,
    }
)
