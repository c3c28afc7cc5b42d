"""Settings for every service: read once at start-up from the environment and CLI flags.

Each service declares its options as a tuple of :class:`Option`; :func:`load` turns the
environment (what systemd's ``EnvironmentFile`` sets) and the command line into one frozen
settings object, and raises :class:`ConfigError` naming the variable when a value is wrong.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Largest encoded image the consumers accept: its base64 (4/3 of it) plus the JSON must still fit
# in one record under the broker's message.max.bytes (~1 MiB). The roles deploy the same value.
MAX_IMAGE_BYTES = 512 * 1024


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Option:
    """One setting: its environment variable, CLI flag, parser, default and check."""

    name: str
    env: str
    help: str
    parse: Callable[[str], Any] = str
    default: Any = None
    required: bool = False
    check: Callable[[Any], bool] | None = None
    check_message: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects NaN
        raise ValueError("must be zero or a positive number")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port from 0 to 65535")
    return value


def comma_list(text: str) -> tuple[str, ...]:
    items = tuple(part.strip() for part in text.split(",") if part.strip())
    if not items:
        raise ValueError("must list at least one item")
    return items


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def image_size(text: str) -> tuple[int, int] | None:
    """``32x32`` -> (32, 32); an empty string or ``any`` accepts every size."""
    if text.strip().lower() in {"", "any"}:
        return None
    width, sep, height = text.lower().partition("x")
    if not sep:
        raise ValueError("must look like 32x32, or be 'any'")
    return positive_int(width), positive_int(height)


KAFKA_OPTIONS: tuple[Option, ...] = (
    Option("bootstrap_servers", "IOT_KAFKA_BOOTSTRAP_SERVERS",
           "Kafka brokers, comma separated host:port", comma_list, required=True),
    Option("images_topic", "IOT_IMAGES_TOPIC", "topic of image messages", default="iot-images"),
    Option("results_topic", "IOT_RESULTS_TOPIC",
           "topic of inference results (may equal the images topic)", default="iot-results"),
    Option("dlq_topic", "IOT_DLQ_TOPIC", "dead-letter topic for messages that cannot be processed",
           default="iot-dead-letter"),
    Option("security_protocol", "IOT_KAFKA_SECURITY_PROTOCOL",
           "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL", default="PLAINTEXT",
           check=lambda v: v in {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"},
           check_message="must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
    Option("ssl_cafile", "IOT_KAFKA_SSL_CAFILE", "CA bundle that signed the brokers' certificates",
           default=None),
    Option("sasl_mechanism", "IOT_KAFKA_SASL_MECHANISM", "SASL mechanism, e.g. SCRAM-SHA-512",
           default=None),
    Option("sasl_username", "IOT_KAFKA_SASL_USERNAME", "SASL user name", default=None),
    Option("sasl_password", "IOT_KAFKA_SASL_PASSWORD", "SASL password", default=None),
)

COMMON_OPTIONS: tuple[Option, ...] = (
    Option("log_level", "IOT_LOG_LEVEL", "logging level", default="INFO",
           check=lambda v: v.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
           check_message="must be DEBUG, INFO, WARNING or ERROR"),
    Option("expected_image_size", "IOT_EXPECTED_IMAGE_SIZE",
           "WIDTHxHEIGHT every image must have ('any' to accept all)", image_size, default="32x32"),
    Option("max_image_bytes", "IOT_MAX_IMAGE_BYTES", "largest encoded image accepted, in bytes",
           positive_int, default=str(MAX_IMAGE_BYTES)),
)

# Both consumers: their group membership and how often a failing batch is tried.
CONSUMER_OPTIONS: tuple[Option, ...] = (
    Option("group_instance_id", "IOT_KAFKA_GROUP_INSTANCE_ID",
           "static group member id, stable across restarts and unique in the group (KIP-345); "
           "empty joins as a dynamic member", default=None),
    Option("session_timeout_ms", "IOT_KAFKA_SESSION_TIMEOUT_MS",
           "how long the group waits for a silent member before moving its partitions",
           positive_int, default="10000"),
    Option("max_attempts", "IOT_MAX_ATTEMPTS",
           "attempts at a batch that fails unexpectedly before its failing records are "
           "dead-lettered", positive_int, default="3"),
)


def metrics_options(default_port: int) -> tuple[Option, ...]:
    """The Prometheus endpoint of a service; each service has its own default port."""
    return (
        Option("metrics_port", "IOT_METRICS_PORT",
               "port of the Prometheus /metrics endpoint (0: no endpoint)", port_number,
               default=str(default_port)),
        # Loopback unless told otherwise: the roles bind every address, behind the hosts' firewall.
        Option("metrics_address", "IOT_METRICS_ADDRESS",
               "address the /metrics endpoint binds to (0.0.0.0: every interface)",
               default="127.0.0.1"),
    )


@dataclass(frozen=True)
class MetricsSettings:
    """Where a service serves its Prometheus metrics; port 0 serves none."""

    address: str = "127.0.0.1"
    port: int = 0


def metrics_settings(values: Mapping[str, Any]) -> MetricsSettings:
    return MetricsSettings(address=values["metrics_address"], port=values["metrics_port"])


@dataclass(frozen=True)
class KafkaSettings:
    """How to reach Kafka and which topics carry what."""

    bootstrap_servers: tuple[str, ...]
    images_topic: str = "iot-images"
    results_topic: str = "iot-results"
    dlq_topic: str = "iot-dead-letter"
    security_protocol: str = "PLAINTEXT"
    ssl_cafile: str | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)

    def client_config(self) -> dict[str, Any]:
        """Keyword arguments shared by every kafka-python client."""
        config: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "security_protocol": self.security_protocol,
        }
        if self.ssl_cafile:
            config["ssl_cafile"] = self.ssl_cafile
        if self.sasl_mechanism:
            config.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        return config


def kafka_settings(values: Mapping[str, Any]) -> KafkaSettings:
    """The Kafka part of a loaded settings dict, checked for consistency."""
    names = {option.name for option in KAFKA_OPTIONS}
    settings = KafkaSettings(**{k: v for k, v in values.items() if k in names})
    if settings.security_protocol.startswith("SASL") and not (
        settings.sasl_mechanism and settings.sasl_username and settings.sasl_password
    ):
        raise ConfigError(
            "IOT_KAFKA_SECURITY_PROTOCOL=SASL_* needs IOT_KAFKA_SASL_MECHANISM, "
            "IOT_KAFKA_SASL_USERNAME and IOT_KAFKA_SASL_PASSWORD"
        )
    return settings


def load(
    options: Iterable[Option],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
    extra_flags: Callable[[argparse.ArgumentParser], None] | None = None,
) -> dict[str, Any]:
    """Parse flags over environment over defaults; return ``{name: parsed value}``.

    A flag given on the command line wins over the environment variable of the same option.
    """
    environ = os.environ if environ is None else environ
    options = tuple(options)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for option in options:
        parser.add_argument(
            option.flag, dest=option.name, default=None, metavar=option.env,
            help=f"{option.help} (env {option.env}"
            + (f", default {option.default!r})" if option.default is not None else ")"),
        )
    if extra_flags:
        extra_flags(parser)
    args = parser.parse_args(argv)

    values: dict[str, Any] = {}
    for option in options:
        raw = getattr(args, option.name)
        source = option.flag
        if raw is None:
            raw = environ.get(option.env)
            source = option.env
        if raw is None or raw == "":
            if option.required:
                raise ConfigError(f"{option.env} is required: {option.help}")
            raw = option.default
            source = f"{option.env} (default)"
        if raw is None:
            values[option.name] = None
            continue
        try:
            value = option.parse(raw) if isinstance(raw, str) else raw
        except ValueError as exc:
            raise ConfigError(f"{source}={raw!r}: {exc}") from None
        if option.check is not None and not option.check(value):
            raise ConfigError(f"{source}={raw!r}: {option.check_message or 'invalid value'}")
        values[option.name] = value
    for key, value in vars(args).items():
        values.setdefault(key, value)
    return values
