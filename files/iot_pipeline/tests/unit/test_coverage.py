"""kafka_io.Coverage: a group member rejoins when a partition of its topics has no owner."""

from types import SimpleNamespace

import pytest
from kafka.errors import KafkaConnectionError
from kafka.structs import TopicPartition

from iot_pipeline import kafka_io


class Member:
    """What Coverage reads of a KafkaConsumer: subscription, metadata, assignment, rejoin."""

    def __init__(self, partitions: int, assigned: set[int]) -> None:
        self.partitions = partitions
        self.assigned = assigned
        self.rejoin_requests = 0
        self._coordinator = SimpleNamespace(request_rejoin=self._rejoin)

    def _rejoin(self) -> None:
        self.rejoin_requests += 1

    def subscription(self):
        return {"images"}

    def partitions_for_topic(self, topic):
        return set(range(self.partitions))

    def assignment(self):
        return {TopicPartition("images", p) for p in self.assigned}


def described(*assignments: list[int], state: str = "Stable", as_dict: bool = True) -> dict:
    members = []
    for partitions in assignments:
        if as_dict:
            assignment = {"assigned_partitions": [{"topic": "images", "partitions": partitions}]}
        else:
            assignment = SimpleNamespace(assigned_partitions=[("images", partitions)])
        members.append({"member_assignment": assignment})
    return {"error": None, "group_state": state, "members": members}


class Group:
    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self, group_id: str) -> dict:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize("as_dict", [True, False])
def test_a_partition_nobody_owns_makes_the_member_rejoin(as_dict):
    member = Member(partitions=4, assigned={0, 1})
    group = Group(described([0, 1], [2], as_dict=as_dict))  # partition 3 added since
    coverage = kafka_io.Coverage(member, "db", group, interval_s=60)
    assert coverage.check() is True
    assert member.rejoin_requests == 1
    assert coverage.rejoins == 1


def test_a_fully_owned_topic_is_described_once_and_never_rejoined():
    member = Member(partitions=3, assigned={0})
    group = Group(described([0], [1, 2]))
    coverage = kafka_io.Coverage(member, "db", group, interval_s=0)
    for _ in range(5):
        assert coverage.check() is False
    assert group.calls == 1  # nothing changed since it was found owned
    assert member.rejoin_requests == 0
    member.partitions = 4  # the topic grew: asked again
    assert coverage.check() is True
    assert group.calls == 2


def test_a_group_that_is_rebalancing_is_left_alone_and_asked_again_later():
    member = Member(partitions=4, assigned={0})
    group = Group(described([0], state="PreparingRebalance"))
    coverage = kafka_io.Coverage(member, "db", group, interval_s=0)
    assert coverage.check() is False
    group.answer = described([0])
    assert coverage.check() is True


def test_a_coordinator_that_cannot_answer_never_stops_the_member():
    member = Member(partitions=4, assigned={0})
    group = Group(KafkaConnectionError("broker restarting"))
    coverage = kafka_io.Coverage(member, "db", group, interval_s=0)
    assert coverage.check() is False
    assert member.rejoin_requests == 0


def test_checks_wait_for_the_interval_unless_the_assignment_changed():
    member = Member(partitions=4, assigned={0})
    group = Group(described([0], [1, 2]))
    coverage = kafka_io.Coverage(member, "db", group, interval_s=3600)
    assert coverage.check() is True
    assert coverage.check() is False  # within the interval, same assignment: not asked
    assert group.calls == 1
    member.assigned = {0, 3}  # the rebalance moved partitions: checked at once
    group.answer = described([0, 3], [1, 2])
    assert coverage.check() is False
    assert group.calls == 2
