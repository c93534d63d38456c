from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeward_shared.bus.base import topic_matches
from edgeward_shared.errors import PolicyError
from edgeward_shared.topics import Channel, Direction, device_topic, parse_topic

device_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", fullmatch=True)


@given(device_id=device_ids, direction=st.sampled_from(Direction), channel=st.sampled_from(Channel))
def test_device_topics_round_trip(device_id: str, direction: Direction, channel: Channel) -> None:
    parsed = parse_topic(device_topic(device_id, direction, channel))
    assert (parsed.device_id, parsed.direction, parsed.channel) == (device_id, direction, channel)  # type: ignore[union-attr]


@given(st.text(max_size=300))
def test_parser_never_raises_anything_but_policy_error(text: str) -> None:
    with contextlib.suppress(PolicyError):
        parse_topic(text)  # anything but PolicyError(topic.invalid) fails the test


levels = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=5)


@given(topic=levels)
def test_topic_matching_wildcards(topic: list[str]) -> None:
    concrete = "/".join(topic)
    assert topic_matches(concrete, concrete)
    assert topic_matches("#", concrete)
    assert topic_matches("/".join(["+"] * len(topic)), concrete)
    assert not topic_matches("/".join(["+"] * (len(topic) + 1)), concrete)
    assert topic_matches(f"{topic[0]}/#", concrete)  # '#' also matches the parent level
    assert topic_matches(f"$share/g/{concrete}", concrete)


@pytest.mark.parametrize("topic", ["$SYS/broker/uptime", "$CONTROL/dynamic-security/v1"])
def test_wildcards_do_not_match_dollar_topics(topic: str) -> None:
    assert not topic_matches("#", topic)
    assert not topic_matches("+/broker/uptime", topic)
    assert topic_matches("$SYS/#", "$SYS/broker/uptime")
