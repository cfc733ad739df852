"""A repartition topic left with calls when a deployment starts keyed.

Switched to ``worker.input_keyed_by_group_id = true``, a deployment no longer reads its
repartition topic: the calls its first stage forwarded there and its second stage had
not read yet would be lost unseen (no error, group counts one short). A keyed start
looks for them first and refuses to run while there are any.
"""

from __future__ import annotations

import time

import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as ClientError

from worker.config import Config
from worker.errors import FatalError, RetriableError, TopicError
from worker.kafka import client_config, translate

__all__ = ["check_drained"]

log = structlog.get_logger("worker.drain")
_TIMEOUT = 10.0
# How long reading the partitions' unread parts may take before it counts as a broker
# not answering (the start is tried again).
_READ_SECONDS = 30.0


def check_drained(config: Config, topic: str, partitions: int) -> None:
    """Raise ``TopicError`` when ``topic`` holds a call past the deployment's committed
    offsets on it; ``RetriableError`` when that cannot be found out yet. Blocks."""
    settings = {
        "group.id": config.worker.group_id,  # never joins: reads its committed offsets
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
    }
    kafka = config.kafka
    consumer = Consumer(
        client_config(kafka.bootstrap_servers, kafka.properties, "consumer", settings)
    )
    try:
        unread = _unread(consumer, topic, partitions)
    except KafkaException as e:
        error = translate(e.args[0])
        if not isinstance(error, FatalError):  # the start is tried again (await_topics)
            raise RetriableError(f"cannot read topic {topic}: {error}") from None
        # Not allowed to read it (a keyed deployment's ACLs need not cover it).
        log.warning("repartition_topic_unchecked", topic=topic, error=str(error))
        return
    finally:
        consumer.close()
    if unread:
        raise TopicError(
            f"topic {topic} holds calls this deployment's first stage forwarded and its "
            f"second stage has not read (partitions {', '.join(map(str, unread))}); with "
            "worker.input_keyed_by_group_id = true nothing reads them. Run the deployment "
            "with it false until that topic's lag is 0, then switch (stop every worker "
            "first: the two layouts must not run side by side)"
        )


def _unread(consumer: Consumer, topic: str, partitions: int) -> list[int]:
    """The partitions of ``topic`` with a committed record past the group's offset."""
    wanted = [TopicPartition(topic, p) for p in range(partitions)]
    starts = []
    for tp in consumer.committed(wanted, timeout=_TIMEOUT):
        low, high = consumer.get_watermark_offsets(tp, timeout=_TIMEOUT)
        start = max(tp.offset, low)  # no committed offset (-1001): the first record
        if start < high:  # transaction markers count too: reading tells them apart
            starts.append(TopicPartition(topic, tp.partition, start))
    if not starts:
        return []
    consumer.assign(starts)
    waiting, found = {tp.partition for tp in starts}, set[int]()
    deadline = time.monotonic() + _READ_SECONDS
    while waiting:
        if time.monotonic() > deadline:
            raise RetriableError(f"cannot read topic {topic} to the end")
        for message in consumer.consume(500, 0.01):
            error = message.error()
            if error is not None and error.code() != ClientError._PARTITION_EOF:
                raise KafkaException(error)
            partition = message.partition() or 0
            waiting.discard(partition)
            if error is None:
                found.add(partition)
    return sorted(found)
