"""Topic grammar, matching, coverage and the subscription trie."""

from __future__ import annotations

import pytest

from sentientedge.errors import BadTopic
from sentientedge.topics import (
    TopicTrie,
    covers,
    matches,
    placement_key,
    validate_filter,
    validate_topic,
)


@pytest.mark.parametrize(
    "topic",
    ["drone/7/telemetry", "fleet/alpha/status", "a", "a/b/c/d/e/f/g/h", "x:y.z-1_2", "$sys/load"],
)
def test_valid_topics(topic):
    assert validate_topic(topic) == tuple(topic.split("/"))


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "a//b",
        "a/",
        "/a",
        "a/b/c/d/e/f/g/h/i",
        "x" * 65,
        "a b",
        "drone/ü",
        "drone/+/x",
        "a/#",
        "a/$b",
        7,
    ],
)
def test_invalid_topics(topic):
    with pytest.raises(BadTopic):
        validate_topic(topic)


@pytest.mark.parametrize(
    "topic_filter", ["#", "+", "drone/+/telemetry", "drone/#", "+/+/+", "$sys/#"]
)
def test_valid_filters(topic_filter):
    validate_filter(topic_filter)


@pytest.mark.parametrize("topic_filter", ["#/a", "a/#/b", "a+/b", "a/b#", ""])
def test_invalid_filters(topic_filter):
    with pytest.raises(BadTopic):
        validate_filter(topic_filter)


@pytest.mark.parametrize(
    "topic_filter, topic, expected",
    [
        ("drone/+/telemetry", "drone/7/telemetry", True),
        ("drone/+/telemetry", "drone/7/status", False),
        ("drone/+/telemetry", "drone/7/telemetry/x", False),
        ("drone/#", "drone", True),  # '#' includes the parent level (MQTT 4.7.1.2)
        ("drone/#", "drone/7/cmd/result", True),
        ("#", "fleet/a", True),
        ("#", "$sys/load", False),  # wildcards at the first level skip $ topics (MQTT 4.7.2)
        ("+/load", "$sys/load", False),
        ("$sys/#", "$sys/load", True),
        ("drone/7/cmd", "drone/7/cmd", True),
        ("drone/7/cmd", "drone/7/cmd/result", False),
    ],
)
def test_matching(topic_filter, topic, expected):
    assert matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    "pattern, topic_filter, expected",
    [
        ("drone/#", "drone/+/telemetry", True),
        ("drone/#", "drone/#", True),
        ("drone/#", "#", False),
        ("drone/+/cmd", "drone/7/cmd", True),
        ("drone/+/cmd", "drone/+/cmd", True),
        ("drone/7/cmd", "drone/+/cmd", False),
        ("fleet/#", "fleet", True),
        ("+/x", "#", False),
        ("#", "$sys/#", False),
    ],
)
def test_covers(pattern, topic_filter, expected):
    assert covers(pattern, topic_filter) is expected


def test_trie_matches_like_matches():
    trie: TopicTrie[str] = TopicTrie()
    filters = [
        "drone/+/telemetry",
        "drone/#",
        "drone/7/telemetry",
        "#",
        "+/+",
        "fleet/a/#",
        "$sys/#",
    ]
    for index, topic_filter in enumerate(filters):
        trie.add(topic_filter, f"h{index}")
    for topic in [
        "drone/7/telemetry",
        "drone/8/status",
        "drone",
        "fleet/a",
        "fleet/a/b",
        "x/y",
        "$sys/x",
    ]:
        expected = {f"h{i}" for i, f in enumerate(filters) if matches(f, topic)}
        assert trie.match(topic) == expected, topic


def test_trie_add_and_remove_report_first_and_last_holder():
    trie: TopicTrie[str] = TopicTrie()
    assert trie.add("a/+", "x") is True
    assert trie.add("a/+", "y") is False
    assert trie.match("a/b") == {"x", "y"}
    assert trie.remove("a/+", "x") is False
    assert trie.match("a/b") == {"y"}  # the cache was invalidated
    assert trie.remove("a/+", "y") is True
    assert trie.match("a/b") == frozenset()
    assert len(trie) == 0


def test_trie_remove_holder_everywhere():
    trie: TopicTrie[str] = TopicTrie()
    trie.add("a", "x")
    trie.add("b/#", "x")
    trie.add("b/#", "y")
    assert trie.remove_holder("x") == ["a"]
    assert trie.match("b/c") == {"y"}


def test_a_drones_topics_share_one_placement_key():
    assert placement_key("drone/7/telemetry") == placement_key("drone/7/cmd/result") == "drone/7"
    assert placement_key("drone/7") == "drone/7"
    assert placement_key("fleet/a/b") == "fleet/a/b"
