"""What only the Kafka queue has: its URL. Its behaviour as a queue (delivery, commits,
redelivery, retries and dead letters, members sharing a group) is the Queue contract,
in test_contract.py, run against a real Kafka-protocol broker."""

from __future__ import annotations

import pytest

from pixelmill.queue.kafka import KafkaConfig


def test_config_from_url() -> None:
    config = KafkaConfig.from_url("kafka://a:9092,b:9092?topic=t1&partitions=3&group=g")
    assert (config.bootstrap, config.topic, config.partitions, config.group) == (
        "a:9092,b:9092", "t1", 3, "g",
    )  # fmt: skip
    assert (config.retry_topic, config.dead_topic) == ("t1.retry", "t1.dead")
    with pytest.raises(ValueError, match="unknown parameter"):
        KafkaConfig.from_url("kafka://a:9092?topics=x")
    with pytest.raises(ValueError, match="expected kafka://"):
        KafkaConfig.from_url("kafka://")
