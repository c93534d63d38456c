"""A device's risk state from security facts and behaviour, pure (the table in
docs/telemetry.md, first matching row wins)."""

from __future__ import annotations

from typing import NamedTuple

from edgeward_shared.messages.telemetry import Risk

#: Rules about behaviour (the model's outputs and the device's performance); any other
#: rule in alarm counts as a security fact.
BEHAVIOUR_RULES = frozenset({"output-drift", "latency-outlier", "error-outlier", "latency-fleet"})


class Facts(NamedTuple):
    """A device's facts (a named tuple: one is made for every report)."""

    attestation_failed: bool  # the attestation service reported a failed quote
    attested: bool  # the last report carried an affirming, current attestation result
    protections_missing: int
    high_tier_loaded: bool
    alarms: frozenset[str]  # rules in alarm on the device


def risk(facts: Facts) -> Risk:
    behaviour = security = 0
    if facts.alarms:
        behaviour = len(facts.alarms & BEHAVIOUR_RULES)
        security = len(facts.alarms) - behaviour
    if facts.attestation_failed:
        return "compromised"
    if not facts.attested:
        return "suspect"
    if facts.protections_missing and facts.high_tier_loaded:
        return "suspect"
    if behaviour >= 2 or (behaviour and (security or facts.protections_missing)):
        return "suspect"
    if behaviour or security or facts.protections_missing:
        return "watch"
    return "trusted"
