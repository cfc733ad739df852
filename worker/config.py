"""Configuration: loaded once at start, validated, frozen, passed explicitly.

Sources, later ones winning: the defaults below (mirrored, commented, in
``config/worker.toml``), a TOML file, then environment variables
``GROUP_WORKER_<SECTION>_<KEY>`` (``GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS``). Any other
``GROUP_WORKER_KAFKA_*`` variable sets a librdkafka property (``_`` becomes ``.``:
``GROUP_WORKER_KAFKA_SASL_PASSWORD`` sets ``sasl.password``); a ``_FILE`` suffix reads
the value from that file, for mounted secrets. Every problem raises ``ConfigError``
with one line naming the key.

Internal topics belong to their deployment: unless configured, ``topics.repartition``
and ``topics.dedupe`` are ``<worker.group_id>.repartition`` and ``<worker.group_id>.dedupe``
(as Kafka Streams prefixes internal topics with its ``application.id``). A loaded
``Config`` always holds the resolved names.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import phonenumbers

from worker.errors import ConfigError

__all__ = [
    "Config",
    "HttpConfig",
    "KafkaConfig",
    "LogConfig",
    "ProcessingGuarantee",
    "TopicsConfig",
    "WorkerConfig",
    "load_config",
    "redact",
]

ProcessingGuarantee = Literal["exactly_once", "at_least_once"]
LogLevel = Literal["debug", "info", "warning", "error"]

_ENV_PREFIX = "GROUP_WORKER_"
# Keys whose values logs never show: every secret of _SECRET_VALUES, and more.
_SECRET_MARKERS = ("password", "secret", "key", "token", "credentials", "oauthbearer")
# Kafka properties whose value is a secret (not a path to one): never in the TOML file.
_SECRET_VALUES = (
    "password",
    "secret",
    "token",
    "credentials",
    "ssl.key.pem",
    "sasl.oauthbearer.config",
)
# librdkafka properties the worker sets itself, with the setting that decides each:
# its guarantees and the names of its consumer group and transactions hang on them, so
# a value in [kafka] (which would win for its client) is refused.
_WORKER_OWNED = {
    "bootstrap.servers": "from kafka.bootstrap_servers",
    "group.id": "from worker.group_id",
    "group.instance.id": "from worker.group_instance_id",
    "transactional.id": "from worker.instance_id",
    "enable.idempotence": "from worker.processing_guarantee",
    "isolation.level": "from worker.processing_guarantee",
    "enable.auto.commit": "from worker.processing_guarantee",
    "enable.auto.offset.store": "from worker.processing_guarantee",
    "partition.assignment.strategy": "(cooperative-sticky, none under group.protocol consumer)",
    "enable.partition.eof": "(a restore reads each changelog to the end it reports)",
    # Stage one's re-keyed calls are placed by it: another one would spread a group's
    # calls over partitions, each merging a state of its own.
    "partitioner": "(murmur2_random, the Java client's: each group on one partition)",
    # A new deployment reads its input from the start (and a restore its changelogs):
    # "latest" skipped every call sent before it joined, with no error.
    "auto.offset.reset": "(earliest: nothing sent before a deployment starts is skipped)",
}
# librdkafka's other names for them: a topic-level property may be given with the prefix
# "topic." ("topic.auto.offset.reset"), and two have an old name of their own.
_ALIASES = {"metadata.broker.list": "bootstrap.servers", "auto.commit.enable": "enable.auto.commit"}
# confluent-kafka's own settings, read by the Python client rather than librdkafka: a
# callback, a logger or a table cannot come from text.
_PYTHON_CLIENT_KEYS = frozenset(
    {
        "error_cb",
        "throttle_cb",
        "stats_cb",
        "oauth_cb",
        "on_delivery",
        "on_commit",
        "logger",
        "default.topic.config",
    }
)
_CLIENT_SCOPES = ("consumer.", "producer.", "admin.")
# What Kafka accepts as a topic name (besides "." and "..").
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_INTERNAL_TOPICS = ("repartition", "dedupe")
_TOPIC_RULE = "only letters, digits, '.', '_' and '-', at most 249 characters"
_INTEGER = re.compile(r"-?[0-9]+").fullmatch
# The largest configuration or secret file read.
_MAX_FILE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    # Any other librdkafka property, passed to every client as is.
    properties: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TopicsConfig:
    input: str = "segment.raw"
    enriched: str = "segment.group.enriched"
    state: str = "segment.group.state"
    members: str = "segment.group.members"
    dlq: str = "segment.group.dlq"
    # Internal. Empty: "<worker.group_id>.repartition", filled in by load_config.
    repartition: str = ""
    # Internal: the dedupe ids' changelog. Empty: "<worker.group_id>.dedupe".
    dedupe: str = ""
    partitions: int = 6
    replication_factor: int = -1


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    group_id: str = "group-worker"
    processing_guarantee: ProcessingGuarantee = "exactly_once"
    input_keyed_by_group_id: bool = False
    # A messageId applied within this much *arrival* time (Kafka timestamps) is a duplicate.
    dedupe_window_seconds: int = 86_400
    # No longer used (dedupe has no per-group bound): accepted so older files still load.
    dedupe_max_ids: int = 1_000
    # 0: the largest that fits the output topics' record limits (read at start), at most
    # 256 KiB. See worker.limits.
    max_group_bytes: int = 0
    max_event_bytes: int = 32_768
    max_batch_bytes: int = 524_288
    phone_default_region: str = ""
    instance_id: str = ""
    group_instance_id: str = ""
    batch_size: int = 1_000
    commit_interval_ms: int = 100
    commit_min_interval_ms: int = 20
    commit_max_records: int = 10_000
    commit_max_bytes: int = 33_554_432
    shutdown_timeout_seconds: int = 10
    # Local copies of group state, memberships and dedupe ids (RocksDB), per process
    # under <state_dir>/<group_id>/<slot>; relative paths are from the working directory.
    state_dir: str = "state"
    # Parsed states and memberships kept in memory, in MiB (RocksDB's own cache aside).
    state_cache_mb: int = 32


@dataclass(frozen=True, slots=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: LogLevel = "info"


@dataclass(frozen=True, slots=True)
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    log: LogConfig = field(default_factory=LogConfig)


_SECTIONS: dict[str, type[Any]] = typing.get_type_hints(Config)


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from ``path`` (TOML, optional) and ``environ``.

    Reads the file and any ``_FILE`` secrets; raises ``ConfigError`` on any problem.
    """
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        try:
            document = tomllib.loads(_read_bounded(path, "the configuration").decode())
        except OSError as e:
            raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config: {path} is not UTF-8 text") from None
        except ValueError as e:  # an integer of thousands of digits, which int() refuses
            raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
        except RecursionError:
            raise ConfigError(f"config: {path} nests arrays or tables too deeply") from None
        for section, values in document.items():
            if section not in _SECTIONS:
                hint = _did_you_mean(section, _SECTIONS, "[{}]")
                raise ConfigError(f"config: unknown section [{section}]{hint}")
            if not isinstance(values, dict):
                raise ConfigError(f"config: [{section}] must be a table")
            if section == "kafka":
                try:
                    _refuse_secrets(values, path)
                except RecursionError:  # a dotted key of thousands of parts
                    raise ConfigError(f"config: [kafka] in {path} nests too deeply") from None
            raw[section] = dict(values)
    _apply_environment(raw, os.environ if environ is None else environ)
    config = Config(**{name: _build(name, raw.get(name, {})) for name in _SECTIONS})
    variables = {
        f"{section}.{key}": value.variable
        for section, values in raw.items()
        for key, value in values.items()
        if isinstance(value, _Text)
    }
    config = _with_internal_topics(config)
    region = config.worker.phone_default_region.strip().upper()  # "us" means "US"
    config = replace(config, worker=replace(config.worker, phone_default_region=region))
    _validate(config, lambda key: f"{key} ({variables[key]})" if key in variables else key)
    return config


def redact(properties: Mapping[str, Any]) -> dict[str, Any]:
    """``properties`` with the values of secret-looking keys replaced, for logging."""
    return {
        k: "***" if any(m in k.lower() for m in _SECRET_MARKERS) else v
        for k, v in properties.items()
    }


# (key, lowest, highest) for the numbers whose range the types do not say.
_RANGES = (
    ("topics.partitions", 1, 10_000),
    ("worker.batch_size", 1, 100_000),
    ("worker.dedupe_max_ids", 1, 100_000),
    ("worker.commit_interval_ms", 1, 600_000),
    ("worker.commit_min_interval_ms", 0, 600_000),
    ("worker.commit_max_records", 1, 1_000_000),
    ("worker.commit_max_bytes", 1_048_576, 1_073_741_824),
    ("worker.dedupe_window_seconds", 1, 366 * 86_400),
    ("worker.max_event_bytes", 1, 100_000_000),
    ("worker.max_batch_bytes", 1, 100_000_000),
    ("worker.max_group_bytes", 0, 100_000_000),
    ("worker.shutdown_timeout_seconds", 1, 3_600),
    ("worker.state_cache_mb", 1, 1_000_000),
    ("http.port", 0, 65_535),
)


def _with_internal_topics(config: Config) -> Config:
    """``config`` with each unset internal topic named after ``worker.group_id``."""
    names: dict[str, Any] = {}
    for key in _INTERNAL_TOPICS:
        if getattr(config.topics, key):
            continue
        name = f"{config.worker.group_id}.{key}"
        if not _legal_topic(name):
            raise ConfigError(
                f"config: worker.group_id {config.worker.group_id!r} gives topics.{key} "
                f"{name!r}, not a legal topic name ({_TOPIC_RULE}): change it or set "
                f"topics.{key}"
            )
        names[key] = name
    return replace(config, topics=replace(config.topics, **names))


def _legal_topic(name: str) -> bool:
    return name not in (".", "..") and _TOPIC_NAME.fullmatch(name) is not None


def _validate(config: Config, named: Callable[[str], str]) -> None:
    """Raise ``ConfigError`` for a value out of its range; ``named`` gives a key with the
    environment variable that set it, if one did."""
    for name, lowest, highest in _RANGES:
        section, key = name.split(".")
        value = getattr(getattr(config, section), key)
        if value < lowest:
            raise ConfigError(f"config: {named(name)} must be at least {lowest}, got {value}")
        if value > highest:
            raise ConfigError(f"config: {named(name)} must be at most {highest}, got {value}")
    replication = config.topics.replication_factor
    if replication == 0 or not -1 <= replication <= 32_767:  # Kafka's is 16 bits
        raise ConfigError(
            f"config: {named('topics.replication_factor')} must be -1 (the broker's default) "
            f"or at least 1 (at most 32767), got {replication}"
        )
    if config.worker.max_batch_bytes < config.worker.max_event_bytes:
        raise ConfigError("config: worker.max_batch_bytes must be at least worker.max_event_bytes")
    for name, text in (
        ("worker.group_id", config.worker.group_id),
        ("kafka.bootstrap_servers", config.kafka.bootstrap_servers.strip()),
        ("worker.state_dir", config.worker.state_dir),
    ):
        if not text:
            raise ConfigError(f"config: {named(name)} must not be empty")
    if not config.http.host.strip():  # Python's server would listen on every interface
        raise ConfigError(
            f"config: {named('http.host')} must not be empty (0.0.0.0 listens on every "
            "interface, 127.0.0.1 on this machine only)"
        )
    if "\0" in config.worker.state_dir:
        raise ConfigError(f"config: {named('worker.state_dir')} must not hold a NUL character")
    region = config.worker.phone_default_region
    if region and region not in phonenumbers.SUPPORTED_REGIONS:
        # libphonenumber ignores a region it does not know: no number would convert.
        raise ConfigError(
            f"config: {named('worker.phone_default_region')} must be a region code phone "
            f'numbers are known for ("US", "GB", "DE"...) or empty, got {region!r}'
        )
    t = config.topics
    names = {
        "input": t.input,
        "enriched": t.enriched,
        "state": t.state,
        "members": t.members,
        "dlq": t.dlq,
        "repartition": t.repartition,
        "dedupe": t.dedupe,
    }
    seen: dict[str, str] = {}
    for key, topic in names.items():
        if not topic:
            raise ConfigError(f"config: {named(f'topics.{key}')} must not be empty")
        if not _legal_topic(topic):
            raise ConfigError(
                f"config: {named(f'topics.{key}')} {topic!r} is not a legal topic name "
                f"({_TOPIC_RULE})"
            )
        if topic in seen:
            first, second = named(f"topics.{seen[topic]}"), named(f"topics.{key}")
            raise ConfigError(f"config: {second} and {first} are both {topic!r}")
        seen[topic] = key


def _refuse_secrets(values: Mapping[str, Any], path: str | Path, prefix: str = "") -> None:
    """Raise ``ConfigError`` for a secret Kafka property written in the file ``path``
    (which ships as a ConfigMap): it must come from the environment or a mounted file."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):  # a dotted key written unquoted: sasl.password = ...
            _refuse_secrets(value, path, f"{name}.")
        elif any(marker in name.lower() for marker in _SECRET_VALUES):
            variable = f"{_ENV_PREFIX}KAFKA_{name.upper().replace('.', '_')}"
            raise ConfigError(
                f"config: kafka.{name} must not be written in {path}: set {variable}_FILE "
                f"(a file holding it) or {variable} instead"
            )


def _apply_environment(raw: dict[str, dict[str, Any]], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(_ENV_PREFIX):
            continue
        rest = name[len(_ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in _SECTIONS or not key:
            sections = [known.upper() for known in _SECTIONS]
            hint = _did_you_mean(section.upper(), sections, f"{_ENV_PREFIX}{{}}_{key.upper()}")
            raise ConfigError(f"config: unknown environment variable {name}{hint}")
        if key.endswith("_file"):
            key = key.removesuffix("_file")
            try:
                value = _read_bounded(value, name).decode().strip()
            except OSError as e:
                raise ConfigError(f"config: cannot read {name}={value}: {e.strerror}") from None
            except UnicodeDecodeError:  # a secret's: not echoed, nor where it fails
                raise ConfigError(f"config: the file {name} names is not UTF-8 text") from None
        elif not value.isascii() and not _is_utf8(value):  # bytes the OS could not decode
            raise ConfigError(f"config: {name} is not UTF-8 text")
        if section == "kafka" and key != "bootstrap_servers":
            # Else a librdkafka property, "bootstrap.server", which librdkafka refuses
            # without naming the variable.
            if hint := _did_you_mean(
                key.upper(), ["BOOTSTRAP_SERVERS"], f"{_ENV_PREFIX}KAFKA_{{}}"
            ):
                raise ConfigError(f"config: unknown environment variable {name}{hint}")
            key = key.replace("_", ".")
        previous = raw.setdefault(section, {}).get(key)
        if isinstance(previous, _Text):  # which wins would depend on the environment's order
            raise ConfigError(f"config: {previous.variable} and {name} both set {section}.{key}")
        raw[section][key] = _Text(value, name)


def _read_bounded(path: str | Path, what: str) -> bytes:
    """The bytes of ``path``; ``ConfigError`` past ``_MAX_FILE_BYTES`` (``/dev/zero``
    given by mistake would fill the memory)."""
    with open(path, "rb") as f:
        data = f.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise ConfigError(f"config: {path} ({what}) is over {_MAX_FILE_BYTES} bytes")
    return data


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class _Text(str):
    """A value from the environment: text that may stand for a number or a boolean
    (in the file, ``batch_size = "1000"`` is a string, and refused). It keeps the
    variable's name, which its errors give beside the key."""

    variable: str

    def __new__(cls, value: str, variable: str) -> _Text:
        text = super().__new__(cls, value)
        text.variable = variable
        return text


def _build(section: str, values: dict[str, Any]) -> Any:
    cls = _SECTIONS[section]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    properties: dict[str, str] = {}
    for key, value in values.items():
        if key not in hints or key == "properties":
            if section == "kafka":
                properties[key] = _librdkafka_value(key, value)
                continue
            known = [k for k in hints if k != "properties"]
            raise ConfigError(
                f"config: unknown key {_named(f'{section}.{key}', value)}"
                + _did_you_mean(key, known, f"{section}.{{}}")
            )
        name = _named(f"{section}.{key}", value)
        kwargs[key] = _coerce(name, value, hints[key], negative=key == "replication_factor")
    if section == "kafka":
        kwargs["properties"] = properties
    return cls(**kwargs)


def _did_you_mean(name: str, known: Iterable[str], shown: str) -> str:
    """`` (did you mean X?)`` for the known name closest to a misspelt ``name``, if one
    is close; X is that name in ``shown`` (a format: ``"[{}]"``)."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {shown.format(close[0])}?)" if close else ""


def _named(key: str, value: Any) -> str:
    """``key``, and the environment variable that set it, if one did."""
    return f"{key} ({value.variable})" if isinstance(value, _Text) else key


def _coerce(name: str, value: Any, hint: Any, *, negative: bool = False) -> Any:
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"config: {name} must be one of {', '.join(allowed)}, got {value!r}")
        return str(value)
    if hint is bool:
        if isinstance(value, _Text) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"config: {name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, _Text):
            # ASCII digits only: int() also reads "1_000" and other scripts' digits.
            if not _INTEGER(value.strip()):
                raise ConfigError(f"config: {name} must be an integer, got {value!r}")
            if len(value.strip()) > 20:  # int() refuses thousands of digits; none is valid
                raise ConfigError(f"config: {name} is out of range ({len(value)} characters)")
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config: {name} must be an integer, got {value!r}")
        if value < 0 and not negative:
            raise ConfigError(f"config: {name} must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"config: {name} must be a string, got {value!r}")
    return str(value)  # not a _Text


def _librdkafka_value(key: str, value: Any) -> str:
    scope = next((s for s in _CLIENT_SCOPES if key.startswith(s)), "")
    name = key.removeprefix(scope).removeprefix("topic.")
    if name in _PYTHON_CLIENT_KEYS:
        raise ConfigError(
            f"config: {_named(f'kafka.{key}', value)} is not a librdkafka property the "
            "worker passes on"
        )
    owner = _WORKER_OWNED.get(_ALIASES.get(name, name))
    if owner is not None:
        raise ConfigError(f"config: {_named(f'kafka.{key}', value)} is set by the worker {owner}")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    if isinstance(value, dict):  # a dotted key unquoted: security.protocol = "SSL"
        raise ConfigError(
            f'config: kafka.{key} is a table: write a librdkafka property quoted, "{key}.'
            f'{next(iter(value), "")}" = ..., or TOML reads its dots as tables'
        )
    raise ConfigError(f"config: kafka.{key} must be a string, number or boolean")
