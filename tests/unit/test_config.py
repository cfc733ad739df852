"""Loading and validating configuration (worker.config)."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from worker.config import load_config, redact
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    return path


def test_shipped_file_equals_the_built_in_defaults() -> None:
    """config/worker.toml documents exactly the built-in defaults."""
    assert load_config(ROOT / "config" / "worker.toml", {}) == load_config(None, {})


def test_shipped_file_names_every_key() -> None:
    """config/worker.toml lists every key (the benchmark reads it to know which settings
    a checkout takes), but librdkafka's properties and the one no longer used."""
    with open(ROOT / "config" / "worker.toml", "rb") as f:
        shipped = {(s, k) for s, keys in tomllib.load(f).items() for k in keys}
    config = load_config(None, {})
    known = {(s.name, k.name) for s in fields(config) for k in fields(getattr(config, s.name))}
    assert shipped == known - {("kafka", "properties"), ("worker", "dedupe_max_ids")}


def test_repartition_topic_is_named_after_the_consumer_group() -> None:
    """Unset, topics.repartition is <worker.group_id>.repartition, so deployments never share it."""
    assert load_config(None, {}).topics.repartition == "group-worker.repartition"
    billing = load_config(None, {"GROUP_WORKER_WORKER_GROUP_ID": "billing"})
    assert billing.topics.repartition == "billing.repartition"
    longest = load_config(None, {"GROUP_WORKER_WORKER_GROUP_ID": "g" * 237})
    assert len(longest.topics.repartition) == 249


def test_a_configured_repartition_topic_wins_over_the_derived_name(tmp_path: Path) -> None:
    """A repartition name from the file or the environment is kept as it is."""
    path = write(tmp_path, "[topics]\nrepartition = 'from.file'\n[worker]\ngroup_id = 'g'\n")
    assert load_config(path, {}).topics.repartition == "from.file"
    environ = {"GROUP_WORKER_TOPICS_REPARTITION": "from.env"}
    assert load_config(path, environ).topics.repartition == "from.env"


@pytest.mark.parametrize(
    "group_id",
    [
        pytest.param("billing team", id="space"),
        pytest.param("team/billing", id="slash"),
        pytest.param("g" * 238, id="250-characters"),
    ],
)
def test_a_group_id_that_gives_an_illegal_repartition_name_is_refused(group_id: str) -> None:
    """A derived repartition name Kafka would reject fails with one line naming both keys."""
    with pytest.raises(ConfigError) as error:
        load_config(None, {"GROUP_WORKER_WORKER_GROUP_ID": group_id})
    message = str(error.value)
    assert "worker.group_id" in message
    assert "topics.repartition" in message
    assert "\n" not in message


def test_file_values_and_librdkafka_properties_are_read(tmp_path: Path) -> None:
    """Known keys are typed; quoted dotted keys in [kafka] become librdkafka properties."""
    path = write(
        tmp_path,
        """
[kafka]
bootstrap_servers = "b:9092"
"security.protocol" = "SASL_SSL"
"consumer.fetch.max.bytes" = 1048576
[worker]
processing_guarantee = "at_least_once"
batch_size = 50
""",
    )
    config = load_config(path, {})
    assert config.kafka.bootstrap_servers == "b:9092"
    assert config.kafka.properties == {
        "security.protocol": "SASL_SSL",
        "consumer.fetch.max.bytes": "1048576",
    }
    assert config.worker.processing_guarantee == "at_least_once"
    assert config.worker.batch_size == 50


def test_environment_overrides_single_keys(tmp_path: Path) -> None:
    """GROUP_WORKER_<SECTION>_<KEY> overrides one key, typed like the key."""
    config = load_config(
        None,
        {
            "GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS": "k:1",
            "GROUP_WORKER_TOPICS_INPUT": "raw",
            "GROUP_WORKER_WORKER_INPUT_KEYED_BY_GROUP_ID": "true",
            "GROUP_WORKER_HTTP_PORT": "9000",
            "GROUP_WORKER_KAFKA_SASL_USERNAME": "svc",
            "OTHER": "ignored",
        },
    )
    assert config.kafka.bootstrap_servers == "k:1"
    assert config.topics.input == "raw"
    assert config.worker.input_keyed_by_group_id is True
    assert config.http.port == 9000
    assert config.kafka.properties == {"sasl.username": "svc"}


def test_an_unknown_key_like_no_known_one_gets_no_suggestion(tmp_path: Path) -> None:
    """The suggestion is only for a name close to a known one."""
    path = tmp_path / "worker.toml"
    path.write_text("[worker]\nzzz = 1\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, {})
    assert str(raised.value) == "config: unknown key worker.zzz"


def test_secret_is_read_from_a_file(tmp_path: Path) -> None:
    """A _FILE variable reads the value from the named file, for mounted secrets."""
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    config = load_config(None, {"GROUP_WORKER_KAFKA_SASL_PASSWORD_FILE": str(secret)})
    assert config.kafka.properties == {"sasl.password": "s3cret"}
    assert redact(config.kafka.properties) == {"sasl.password": "***"}


@pytest.mark.parametrize("order", [1, -1])
def test_a_setting_given_by_two_variables_is_refused_naming_both(
    tmp_path: Path, order: int
) -> None:
    """A password both in the environment and in a file (or a key spelt two ways): which
    one won depended on the environment's order, so neither is taken."""
    secret = tmp_path / "password"
    secret.write_text("from-file\n")
    variables = [
        ("GROUP_WORKER_KAFKA_SASL_PASSWORD", "from-env"),
        ("GROUP_WORKER_KAFKA_SASL_PASSWORD_FILE", str(secret)),
    ][::order]
    with pytest.raises(ConfigError) as raised:
        load_config(None, dict(variables))
    first, second = (name for name, _ in variables)
    assert str(raised.value) == f"config: {first} and {second} both set kafka.sasl.password"
    assert "from-" not in str(raised.value)


def test_every_secret_the_file_refuses_is_redacted_for_logs() -> None:
    """What may not be written in the file (a secret value) is never shown in a log."""
    names = ["sasl.password", "ssl.key.pem", "sasl.oauthbearer.config", "ssl.keystore.password"]
    environ = {f"GROUP_WORKER_KAFKA_{n.upper().replace('.', '_')}": "S3CR3T" for n in names}
    properties = load_config(None, environ).kafka.properties
    assert set(properties) == set(names)
    assert "S3CR3T" not in repr(redact(properties))
    assert redact({"sasl.username": "svc"}) == {"sasl.username": "svc"}


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        pytest.param(
            "[worker]\nbatch_sise = 1\n",
            {},
            "unknown key worker.batch_sise (did you mean worker.batch_size?)",
            id="unknown-key",
        ),
        pytest.param(
            "[wroker]\n",
            {},
            "unknown section [wroker] (did you mean [worker]?)",
            id="unknown-section",
        ),
        pytest.param(
            "[worker]\nbatch_size = 'many'\n",
            {},
            "worker.batch_size must be an integer",
            id="not-an-integer",
        ),
        pytest.param(
            "[worker]\nbatch_size = '1000'\n",
            {},
            "worker.batch_size must be an integer, got '1000'",
            id="integer-as-text-in-the-file",
        ),
        pytest.param(
            "[worker]\ninput_keyed_by_group_id = 'yes'\n",
            {},
            "worker.input_keyed_by_group_id must be true or false",
            id="boolean-as-text-in-the-file",
        ),
        pytest.param(
            "[worker]\ndedupe_window_seconds = 0\n",
            {},
            "worker.dedupe_window_seconds must be at least 1",
            id="no-dedupe-window",
        ),
        pytest.param(
            "[topics]\nreplication_factor = -7\n",
            {},
            "topics.replication_factor must be -1 (the broker's default) or at least 1",
            id="replication-factor",
        ),
        pytest.param(
            "",
            {"GROUP_WORKER_TOPICS_REPLICATION_FACTOR": "0"},
            "topics.replication_factor (GROUP_WORKER_TOPICS_REPLICATION_FACTOR) must be -1",
            id="replication-factor-env",
        ),
        pytest.param(
            "[worker]\nmax_batch_bytes = 99999999999\n",
            {},
            "worker.max_batch_bytes must be at most 100000000",
            id="batch-bytes-range",
        ),
        pytest.param(
            "[worker]\nbatch_size = 0\n",
            {},
            "worker.batch_size must be at least 1",
            id="zero-batch",
        ),
        pytest.param(
            "[worker]\nprocessing_guarantee = 'maybe'\n",
            {},
            "worker.processing_guarantee must be one of",
            id="bad-literal",
        ),
        pytest.param(
            "[http]\nport = 70000\n", {}, "http.port must be at most 65535", id="port-range"
        ),
        pytest.param(
            "",
            {"GROUP_WORKER_WORKER_BATCH_SIZE": "many"},
            "worker.batch_size (GROUP_WORKER_WORKER_BATCH_SIZE) must be an integer, got 'many'",
            id="env-error-names-the-variable",
        ),
        pytest.param(
            "",
            {"GROUP_WORKER_WROKER_BATCH_SIZE": "10"},
            "unknown environment variable GROUP_WORKER_WROKER_BATCH_SIZE "
            "(did you mean GROUP_WORKER_WORKER_BATCH_SIZE?)",
            id="env-unknown-section",
        ),
        pytest.param(
            "",
            {"GROUP_WORKER_WORKER_BATCHSIZE": "10"},
            "unknown key worker.batchsize (GROUP_WORKER_WORKER_BATCHSIZE) "
            "(did you mean worker.batch_size?)",
            id="env-unknown-key-names-the-variable",
        ),
        pytest.param(
            "",
            {"GROUP_WORKER_WORKER_COMMIT_MIN_INTERVAL_MS": "-1"},
            "(GROUP_WORKER_WORKER_COMMIT_MIN_INTERVAL_MS) must not be negative",
            id="negative-min-interval",
        ),
        pytest.param(
            "[topics]\nenriched = 'segment.raw'\n", {}, "topics.enriched", id="topic-reused"
        ),
        pytest.param(
            "",
            {"GROUP_WORKER_TOPICS_ENRICHED": "segment.raw"},
            "topics.enriched (GROUP_WORKER_TOPICS_ENRICHED) and topics.input are both",
            id="topic-reused-env",
        ),
        pytest.param(
            "[worker]\ngroup_id = 'segment'\n[topics]\ninput = 'segment.repartition'\n",
            {},
            "topics.repartition and topics.input are both 'segment.repartition'",
            id="derived-repartition-reused",
        ),
        pytest.param(
            "[topics]\ndlq = 'dead letters'\n", {}, "topics.dlq 'dead letters'", id="illegal-topic"
        ),
        pytest.param(
            "[worker]\ngroup_id = ''\n", {}, "worker.group_id must not be empty", id="no-group"
        ),
        pytest.param("[worker\n", {}, "is not valid TOML", id="bad-toml"),
        pytest.param(
            "",
            {"GROUP_WORKER_KAFKA_SASL_PASSWORD": "pw\udcff"},
            "GROUP_WORKER_KAFKA_SASL_PASSWORD is not UTF-8",
            id="env-not-utf8",
        ),
        pytest.param(
            "",
            {"GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS": ""},
            "kafka.bootstrap_servers (GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS) must not be empty",
            id="no-brokers",
        ),
        pytest.param(
            "",
            {"GROUP_WORKER_WORKER_BATCH_SIZE": "99999999"},
            "worker.batch_size (GROUP_WORKER_WORKER_BATCH_SIZE) must be at most 100000",
            id="range-env",
        ),
        pytest.param(
            "",
            {"GROUP_WORKER_TOPICS_INPUT": "a b"},
            "topics.input (GROUP_WORKER_TOPICS_INPUT) 'a b' is not a legal topic name",
            id="illegal-topic-env",
        ),
        pytest.param(  # int() reads these: 3 and 1000
            "", {"GROUP_WORKER_WORKER_BATCH_SIZE": "\u0663"}, "must be an integer", id="arabic-3"
        ),
        pytest.param(
            "", {"GROUP_WORKER_WORKER_BATCH_SIZE": "1_000"}, "must be an integer", id="1_000"
        ),
        pytest.param(
            '[worker]\nstate_dir = "/tmp/a\\u0000b"\n',  # TOML reads the escape
            {},
            "worker.state_dir must not hold a NUL character",
            id="nul-in-path",
        ),
        pytest.param(
            '[kafka]\nsecurity.protocol = "SSL"\n',
            {},
            'kafka.security is a table: write a librdkafka property quoted, "security.protocol"',
            id="unquoted-dotted-key",
        ),
        pytest.param(
            "[kafka]\n'producer.enable.idempotence' = false\n",
            {},
            "kafka.producer.enable.idempotence is set by the worker from "
            "worker.processing_guarantee",
            id="owned-property",
        ),
        pytest.param(
            "[kafka]\n'consumer.isolation.level' = 'read_uncommitted'\n",
            {},
            "kafka.consumer.isolation.level is set by the worker",
            id="owned-scoped-property",
        ),
        pytest.param(
            "",
            {"GROUP_WORKER_KAFKA_GROUP_ID": "other"},
            "kafka.group.id (GROUP_WORKER_KAFKA_GROUP_ID) is set by the worker from "
            "worker.group_id",
            id="owned-env",
        ),
        pytest.param(  # "latest": a new deployment skipped every call sent before it
            "[kafka]\n'consumer.auto.offset.reset' = 'latest'\n",
            {},
            "kafka.consumer.auto.offset.reset is set by the worker (earliest",
            id="owned-offset-reset",
        ),
        pytest.param(  # "random": one group's re-keyed calls on several partitions
            "",
            {"GROUP_WORKER_KAFKA_PRODUCER_PARTITIONER": "random"},
            "kafka.producer.partitioner (GROUP_WORKER_KAFKA_PRODUCER_PARTITIONER) is set by "
            "the worker (murmur2_random",
            id="owned-partitioner",
        ),
        pytest.param(  # Python's server then listens on every interface
            "",
            {"GROUP_WORKER_HTTP_HOST": " "},
            "http.host (GROUP_WORKER_HTTP_HOST) must not be empty (0.0.0.0 listens on every",
            id="empty-http-host",
        ),
        pytest.param(  # beat kafka.bootstrap_servers and its variable, unseen
            "[kafka]\n'bootstrap.servers' = '127.0.0.1:2'\n",
            {},
            "kafka.bootstrap.servers is set by the worker from kafka.bootstrap_servers",
            id="owned-bootstrap",
        ),
        pytest.param(
            "[worker]\nphone_default_region = 'USA'\n",
            {},
            "worker.phone_default_region must be a region code",
            id="unknown-region",
        ),
        pytest.param(
            "",
            {"GROUP_WORKER_WORKER_PHONE_DEFAULT_REGION": "XX"},
            "got 'XX'",
            id="unknown-region-env",
        ),
        pytest.param(
            "", {"GROUP_WORKER_WORKER_BATCH_SIZE": "x"}, "worker.batch_size", id="bad-env-value"
        ),
        pytest.param(
            "", {"GROUP_WORKER_NOPE_KEY": "x"}, "GROUP_WORKER_NOPE_KEY", id="bad-env-section"
        ),
        pytest.param(  # else the librdkafka property bootstrap.server, refused unnamed
            "",
            {"GROUP_WORKER_KAFKA_BOOTSTRAP_SERVER": "broker:9092"},
            "GROUP_WORKER_KAFKA_BOOTSTRAP_SERVER (did you mean "
            "GROUP_WORKER_KAFKA_BOOTSTRAP_SERVERS?)",
            id="misspelt-bootstrap-env",
        ),
        pytest.param(
            "",
            {"GROUP_WORKER_WORKER_X_FILE": "/nonexistent/x"},
            "cannot read",
            id="missing-secret-file",
        ),
        pytest.param(
            "",
            {"GROUP_WORKER_WORKER_BATCH_SIZE": "9" * 5_000},
            "worker.batch_size (GROUP_WORKER_WORKER_BATCH_SIZE) is out of range",
            id="thousands-of-digits-env",
        ),
        pytest.param(
            "[worker]\nbatch_size = " + "9" * 5_000 + "\n", {}, "not valid TOML", id="toml-digits"
        ),
        pytest.param(
            "[worker]\ngroup_id = " + "[" * 100_000 + "]" * 100_000 + "\n",
            {},
            "too deeply",
            id="toml-nested",
        ),
        pytest.param(
            "[kafka]\n" + "a." * 2_000 + "b = 1\n", {}, "[kafka] in", id="dotted-key-nested"
        ),
        pytest.param(
            "[topics]\nreplication_factor = 2147483648\n",
            {},
            "topics.replication_factor must be -1 (the broker's default) or at least 1 (at most",
            id="replication-factor-past-16-bits",
        ),
        pytest.param(
            "[kafka]\n'consumer.topic.auto.offset.reset' = 'latest'\n",
            {},
            "kafka.consumer.topic.auto.offset.reset is set by the worker (earliest",
            id="owned-with-topic-prefix",
        ),
        pytest.param(
            "[kafka]\n'metadata.broker.list' = '127.0.0.1:2'\n",
            {},
            "kafka.metadata.broker.list is set by the worker from kafka.bootstrap_servers",
            id="owned-by-its-alias",
        ),
        pytest.param(
            "[kafka]\n'consumer.auto.commit.enable' = true\n",
            {},
            "is set by the worker from worker.processing_guarantee",
            id="owned-by-its-topic-alias",
        ),
        pytest.param(
            "[kafka]\nlogger = 'x'\n",
            {},
            "kafka.logger is not a librdkafka property",
            id="python-client-logger",
        ),
        pytest.param(
            "[kafka]\n'consumer.error_cb' = 1\n",
            {},
            "kafka.consumer.error_cb is not a librdkafka property",
            id="python-client-callback",
        ),
    ],
)
def test_bad_configuration_fails_with_one_line_naming_the_key(
    tmp_path: Path, text: str, environ: dict[str, str], message: str
) -> None:
    """Every configuration error is one line that names the key or file."""
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), environ)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_replication_factor_of_minus_one_may_come_from_the_environment() -> None:
    """-1, the broker's default, is as valid from a variable as in the file."""
    config = load_config(None, {"GROUP_WORKER_TOPICS_REPLICATION_FACTOR": "-1"})
    assert config.topics.replication_factor == -1


def test_bytes_that_are_not_utf8_fail_with_one_line_that_shows_no_secret(tmp_path: Path) -> None:
    """A file of configuration or of a secret that is not UTF-8 is one line naming it,
    quoting nothing of the secret."""
    path = tmp_path / "worker.toml"
    path.write_bytes(b"[worker]\ngroup_id = 'a\xff'\n")
    with pytest.raises(ConfigError, match=r"worker\.toml is not UTF-8 text"):
        load_config(path, {})
    secret = tmp_path / "password"
    secret.write_bytes(b"hunter2\xff")
    with pytest.raises(ConfigError) as error:
        load_config(None, {"GROUP_WORKER_KAFKA_SASL_PASSWORD_FILE": str(secret)})
    assert str(error.value) == (
        "config: the file GROUP_WORKER_KAFKA_SASL_PASSWORD_FILE names is not UTF-8 text"
    )


def test_a_phone_region_is_read_in_any_case(tmp_path: Path) -> None:
    """A region code in lower case or with spaces means the same region."""
    config = load_config(write(tmp_path, "[worker]\nphone_default_region = ' gb '\n"), {})
    assert config.worker.phone_default_region == "GB"
    assert load_config(write(tmp_path, ""), {}).worker.phone_default_region == ""


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A configuration file that cannot be read is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", {})


@pytest.mark.parametrize(
    ("line", "variable"),
    [
        ('"sasl.password" = "hunter2-literal"', "GROUP_WORKER_KAFKA_SASL_PASSWORD"),
        ('sasl.password = "hunter2-literal"', "GROUP_WORKER_KAFKA_SASL_PASSWORD"),
        ('"ssl.key.password" = "hunter2-literal"', "GROUP_WORKER_KAFKA_SSL_KEY_PASSWORD"),
        ('"ssl.key.pem" = "hunter2-literal"', "GROUP_WORKER_KAFKA_SSL_KEY_PEM"),
        (
            '"sasl.oauthbearer.client.secret" = "hunter2-literal"',
            "GROUP_WORKER_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET",
        ),
        (
            '"consumer.sasl.password" = "hunter2-literal"',
            "GROUP_WORKER_KAFKA_CONSUMER_SASL_PASSWORD",
        ),
    ],
)
def test_a_secret_written_in_the_file_is_refused(tmp_path: Path, line: str, variable: str) -> None:
    """A secret Kafka property in the TOML file is one ConfigError pointing to the env var
    or _FILE, never echoing the value."""
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, f"[kafka]\n{line}\n"), {})
    message = str(error.value)
    assert f"{variable}_FILE" in message
    assert f"or {variable} instead" in message
    assert "hunter2" not in message
    assert "\n" not in message


def test_paths_to_secrets_and_the_environment_are_accepted(tmp_path: Path) -> None:
    """Paths to key material may be in the file; the password from the environment."""
    text = '[kafka]\n"ssl.key.location" = "/run/tls/key.pem"\n"ssl.ca.location" = "/ca.pem"\n'
    config = load_config(write(tmp_path, text), {"GROUP_WORKER_KAFKA_SASL_PASSWORD": "pw"})
    assert config.kafka.properties == {
        "ssl.key.location": "/run/tls/key.pem",
        "ssl.ca.location": "/ca.pem",
        "sasl.password": "pw",
    }


def test_an_endless_config_or_secret_file_is_refused_not_read_whole() -> None:
    """/dev/zero given as the configuration or a secret's file filled the memory (a
    MemoryError traceback); past 1 MiB it is one line."""
    with pytest.raises(ConfigError, match=r"^config: /dev/zero \(the configuration\) is over"):
        load_config("/dev/zero", {})
    environ = {"GROUP_WORKER_KAFKA_SASL_PASSWORD_FILE": "/dev/zero"}
    with pytest.raises(ConfigError, match=r"\(GROUP_WORKER_KAFKA_SASL_PASSWORD_FILE\) is over"):
        load_config(None, environ)
