"""Topic layout: create what is missing, refuse to start on a layout that breaks the design.

Output topics get the input's partition count, so a group's records land on the
partition number its input came from; the state and members topics are compacted.
Each output topic's ``max.message.bytes`` is read back, so nothing is ever produced
that the broker must refuse (``worker.limits``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import AclOperation, AdminClient, ConfigResource, NewTopic

from worker.config import Config
from worker.drain import check_drained
from worker.errors import FatalError, KafkaError, RetriableError, TopicError
from worker.kafka import client_config, list_topics

__all__ = ["Layout", "TopicSpec", "await_topics", "ensure_topics", "plan_topics", "read_limits"]

log = structlog.get_logger("worker.topics")
_TIMEOUT = 30.0
# Listing the topics, the first step: how long before a start logs that no broker answers.
_REACH_TIMEOUT = 10.0
# Between tries of a start that found no broker: doubling up to the last.
_UNREACHABLE_BACKOFF = (1.0, 2.0, 5.0, 10.0)
_COMPACT = {"cleanup.policy": "compact"}
# Dedupe ids are kept this much longer than the window, so none expires early.
_DEDUPE_MARGIN_MS = 3_600_000
# What the worker does on its topics, in kafka-acls spelling (README "Security").
_READ, _WRITE, _DESCRIBE_CONFIGS = "Read", "Write", "DescribeConfigs"
_OPERATIONS = {
    AclOperation.READ: _READ,
    AclOperation.WRITE: _WRITE,
    AclOperation.DESCRIBE_CONFIGS: _DESCRIBE_CONFIGS,
}


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic the worker needs, with the configs it must have.

    ``configs`` must be as given (``cleanup.policy`` as a set of policies); ``at_least``
    are numeric configs that may be larger. A topic the worker creates gets both.
    """

    name: str
    configs: Mapping[str, str]
    copartitioned: bool
    at_least: Mapping[str, int] = field(default_factory=dict)

    def create_configs(self) -> dict[str, str]:
        """The configs a new topic is created with."""
        return {**self.configs, **{k: str(v) for k, v in self.at_least.items()}}


@dataclass(frozen=True, slots=True)
class Layout:
    """What the worker's topics are: partitions of each, ``max.message.bytes`` of outputs."""

    partitions: Mapping[str, int]
    max_message_bytes: Mapping[str, int]


def plan_topics(config: Config) -> list[TopicSpec]:
    """The output topics of ``config``, in creation order (the input is handled apart).

    The dedupe topic is compacted (one record per id) and deleted a window (and a
    margin) after each record was written, so Kafka expires its ids as the store does.
    """
    t = config.topics
    window_ms = config.worker.dedupe_window_seconds * 1000
    specs = [
        TopicSpec(t.enriched, {}, copartitioned=False),
        TopicSpec(t.dlq, {}, copartitioned=False),
        TopicSpec(t.state, _COMPACT, copartitioned=True),
        TopicSpec(t.members, _COMPACT, copartitioned=True),
        TopicSpec(
            t.dedupe,
            {"cleanup.policy": "compact,delete"},
            copartitioned=True,
            at_least={"retention.ms": window_ms + _DEDUPE_MARGIN_MS},
        ),
    ]
    if not config.worker.input_keyed_by_group_id:
        specs.append(TopicSpec(t.repartition, {}, copartitioned=True))
    return specs


def await_topics(config: Config, sleep: Callable[[float], None] = time.sleep) -> Layout:
    """``ensure_topics``, tried again while no broker answers, for as long as it takes.

    A worker may start before its brokers (a cluster starting, a broker restarting):
    it logs ``kafka_unreachable`` and tries again, the way it rides out a broker that
    goes away later. Blocks; raises what ``ensure_topics`` raises but ``RetriableError``.
    """
    tries = 0
    while True:
        try:
            return ensure_topics(config)
        except RetriableError as e:
            backoff = _UNREACHABLE_BACKOFF[min(tries, len(_UNREACHABLE_BACKOFF) - 1)]
            log.warning("kafka_unreachable", error=str(e), retry_seconds=backoff)
            sleep(backoff)
            tries += 1


def ensure_topics(config: Config) -> Layout:
    """Create missing topics, check existing ones, and read the output topics' limits.

    Blocks on the admin API (up to 30 s per step). Raises ``RetriableError`` when no
    broker answers, ``TopicError`` with one clear line when a topic cannot be created, a
    co-partitioned topic's partition count differs from the input's, or a topic that
    must be compacted is not, or a keyed start finds calls left in the repartition topic
    (``drain``); ``FatalError`` when the broker refuses the login, or this principal
    lacks an ACL the worker needs on one of the topics (naming both).
    """
    admin = _admin(config)
    existing = _partition_counts(admin, config.kafka.bootstrap_servers)
    input_topic = config.topics.input
    replication = config.topics.replication_factor
    if input_topic not in existing:
        if _create(admin, [NewTopic(input_topic, config.topics.partitions, replication)]):
            log.warning(
                "input_topic_created",
                topic=input_topic,
                partitions=config.topics.partitions,
                note="there was no such topic: the worker reads what is sent to it from now "
                "on (a mistyped topics.input reads nothing)",
            )
        existing[input_topic] = config.topics.partitions
    partitions = existing[input_topic]
    specs = plan_topics(config)
    missing = [s for s in specs if s.name not in existing]
    for spec in specs:
        if spec.copartitioned and existing.get(spec.name, partitions) != partitions:
            raise TopicError(
                f"topic {spec.name} has {existing[spec.name]} partitions but input "
                f"{input_topic} has {partitions}: they must match (state is co-partitioned)"
            )
    needs = _needs(input_topic, specs)
    _check_access(admin, {n: ops for n, ops in needs.items() if n in existing})
    # Topics that exist must have the configs the design needs; new ones are made so.
    _check_configs(admin, [s for s in specs if s.create_configs() and s.name in existing])
    created = _create(
        admin,
        [NewTopic(s.name, partitions, replication, config=s.create_configs()) for s in missing],
    )
    if created:
        log.info("topics_created", topics=created, partitions=partitions)
    _check_access(admin, {s.name: needs[s.name] for s in missing})
    repartition = config.topics.repartition
    if config.worker.input_keyed_by_group_id and repartition in existing:
        check_drained(config, repartition, existing[repartition])
    existing.update((s.name, partitions) for s in missing)
    return Layout(
        {n: existing[n] for n in [input_topic, *(s.name for s in specs)]},
        _max_message_bytes(admin, specs),
    )


def read_limits(config: Config) -> dict[str, int]:
    """The output topics' ``max.message.bytes`` as the broker has them now. Blocks.

    For a running worker: raises ``KafkaError`` when they cannot be read, so its
    clients are rebuilt and it tries again.
    """
    try:
        return _max_message_bytes(_admin(config), plan_topics(config))
    except TopicError as e:
        raise KafkaError(f"cannot read the output topics' limits again: {e}") from None


def _admin(config: Config) -> AdminClient:
    return AdminClient(
        client_config(config.kafka.bootstrap_servers, config.kafka.properties, "admin")
    )


def _max_message_bytes(admin: AdminClient, specs: list[TopicSpec]) -> dict[str, int]:
    return {
        s.name: int(configs["max.message.bytes"].value)
        for s, configs in zip(specs, _describe(admin, specs), strict=True)
    }


def _partition_counts(admin: AdminClient, servers: str) -> dict[str, int]:
    try:
        metadata = list_topics(admin, timeout=_REACH_TIMEOUT)
    except KafkaException as e:
        admin.poll(0)  # hand over the client's own lines (which broker failed, and how)
        raise RetriableError(
            f"cannot reach Kafka at {servers} (kafka.bootstrap_servers) to list topics: "
            f"{e.args[0].str()}"
        ) from None
    return {name: len(topic.partitions) for name, topic in metadata.topics.items()}


def _create(admin: AdminClient, topics: list[NewTopic]) -> list[str]:
    """Create ``topics``; returns the names of those this call created (not a peer)."""
    if not topics:
        return []
    created = []
    futures = admin.create_topics(topics, operation_timeout=_TIMEOUT)
    for name, future in futures.items():
        try:
            future.result(_TIMEOUT)
            created.append(name)
        except KafkaException as e:
            if e.args[0].code() != e.args[0].TOPIC_ALREADY_EXISTS:  # a peer created it first
                raise TopicError(f"cannot create topic {name}: {e.args[0].str()}") from None
    return created


def _describe(admin: AdminClient, specs: list[TopicSpec]) -> list[Mapping[str, Any]]:
    """Each topic's configuration entries, retrying while a new topic's metadata settles."""
    resources = [ConfigResource(ConfigResource.Type.TOPIC, s.name) for s in specs]
    deadline = time.monotonic() + _TIMEOUT
    while True:
        futures = admin.describe_configs(resources, request_timeout=_TIMEOUT)
        try:
            return [futures[r].result(_TIMEOUT) for r in resources]
        except KafkaException as e:
            error = e.args[0]
            if error.code() != error.UNKNOWN_TOPIC_OR_PART or time.monotonic() > deadline:
                raise TopicError(f"cannot describe topics: {error.str()}") from None
            time.sleep(0.2)


def _needs(input_topic: str, specs: list[TopicSpec]) -> dict[str, set[str]]:
    """The operations the worker does on each topic (README "Security")."""
    needs = {input_topic: {_READ}}
    for spec in specs:
        # The co-partitioned topics are the ones read back (restored or consumed).
        needs[spec.name] = {_WRITE, _DESCRIBE_CONFIGS} | ({_READ} if spec.copartitioned else set())
    return needs


def _check_access(admin: AdminClient, needs: dict[str, set[str]]) -> None:
    """Raise ``FatalError`` naming a topic and the operation this principal may not do
    there, so a missing ACL stops the worker at start, not in its first transaction.

    The broker says which operations the principal may do on each topic (KIP-430); one
    without an authorizer allows all. Retries while a new topic's metadata settles.
    """
    deadline = time.monotonic() + _TIMEOUT
    pending = dict(needs)
    while pending:
        futures = admin.describe_topics(
            TopicCollection(list(pending)),
            request_timeout=_TIMEOUT,
            include_authorized_operations=True,
        )
        for name, wanted in list(pending.items()):
            try:
                allowed = futures[name].result(_TIMEOUT).authorized_operations
            except KafkaException as e:
                code = e.args[0].code()
                if code == e.args[0].UNKNOWN_TOPIC_OR_PART and time.monotonic() < deadline:
                    continue
                if code != e.args[0].TOPIC_AUTHORIZATION_FAILED:
                    raise TopicError(f"cannot describe topic {name}: {e.args[0].str()}") from None
                raise FatalError(
                    f"not authorized: this principal may not even Describe topic {name}; it "
                    f'needs {", ".join(sorted(wanted))} there (README "Security")'
                ) from None
            del pending[name]
            if allowed is None:  # a broker too old to say
                continue
            lacking = wanted - {_OPERATIONS.get(op, "") for op in allowed}
            if lacking:
                raise FatalError(
                    f"not authorized: this principal lacks {', '.join(sorted(lacking))} on "
                    f'topic {name} (the ACLs it needs: README "Security")'
                )
        if pending:
            time.sleep(0.2)


def _check_configs(admin: AdminClient, specs: list[TopicSpec]) -> None:
    if not specs:
        return
    for spec, actual in zip(specs, _describe(admin, specs), strict=True):
        for key, wanted in spec.configs.items():
            found = actual[key].value if key in actual else None
            if found is None or _policies(found) != _policies(wanted):
                raise TopicError(f"topic {spec.name} must have {key}={wanted}, has {found}")
        for key, least in spec.at_least.items():
            found = actual[key].value if key in actual else None
            if found is None or 0 <= int(found) < least:  # -1: unlimited
                raise TopicError(f"topic {spec.name} must have {key} >= {least}, has {found}")


def _policies(value: str) -> frozenset[str]:
    return frozenset(p.strip() for p in value.split(","))
