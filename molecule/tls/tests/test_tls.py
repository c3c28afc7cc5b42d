"""The pipeline with pipeline_tls: true. Data flows end to end over SASL_SSL and verified TLS, and
the doors a stranger would try are closed: plaintext Kafka, a wrong SCRAM password, the brokers'
mutual-TLS listener without a certificate, PostgreSQL without TLS, and other databases."""

import time

import pytest

testinfra_hosts = ["ansible://database"]

TABLE = "iot_image_data"
FIRST_RUN = 200  # iot_simulator_count (inventory/hosts.yml)
TIMEOUT_S = 600
ENV_DIR = "/etc/iot-pipeline"
CA = f"{ENV_DIR}/tls/ca.crt"
KAFKA_BIN = "/opt/kafka/current/bin"
ADMIN = "--bootstrap-server {}:9094 --command-config /etc/kafka/admin.properties"
KAFKA_ENV = "LOG_DIR=/tmp KAFKA_HEAP_OPTS=-Xmx128m"
VENV_PYTHON = "/opt/iot-pipeline/venv/bin/python"

# Connects to the client listener with the given settings and prints OK or the error's class name.
KAFKA_PROBE = """
import os, sys
from kafka import KafkaConsumer
settings = dict(bootstrap_servers=sys.argv[1], security_protocol=sys.argv[2],
                request_timeout_ms=8000)
if sys.argv[2] != "PLAINTEXT":
    settings.update(ssl_cafile=os.environ["IOT_KAFKA_SSL_CAFILE"],
                    sasl_mechanism=os.environ["IOT_KAFKA_SASL_MECHANISM"],
                    sasl_plain_username=os.environ["IOT_KAFKA_SASL_USERNAME"],
                    sasl_plain_password=sys.argv[3] if len(sys.argv) > 3
                    else os.environ["IOT_KAFKA_SASL_PASSWORD"])
try:
    topics = KafkaConsumer(**settings).topics()
    print("OK", sorted(topics))
except Exception as exc:
    print(type(exc).__name__, exc)
"""

# A TLS client on the brokers' INTERNAL listener, with a client certificate (argv[4], a PEM with
# key and certificate) or without one, in which case the handshake must fail.
TLS_PROBE = """
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[3])
if len(sys.argv) > 4:
    ctx.load_cert_chain(sys.argv[4])
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=sys.argv[1]) as tls:
            tls.sendall(b"\\x00\\x00\\x00\\x00")
            data = tls.recv(1)
            print("CLOSED" if not data else "OPEN")
except (ssl.SSLError, ConnectionError, OSError) as exc:
    print("REFUSED", type(exc).__name__, exc)
"""


@pytest.fixture(scope="module")
def kafka_host(host):
    """The broker's name as the inventory gives it (tls-kafka, vm2): the certificates cover it."""
    return host.ansible.get_variables()["groups"]["kafka"][0]


def tier(host, group):
    # With the verifier's --sudo (vms: SSH as the deploy user), the other hosts need it too.
    return host.get_hosts(
        [f"ansible://{group}"],
        ansible_inventory=host.backend.ansible_inventory,
        sudo=host.backend.sudo,
    )[0]


def psql_postgres(host, sql):
    return host.run("runuser -u postgres -- psql -X -A -t -q -d iot -c %s", sql)


def run_with_env(host, env_file, argv):
    """Runs argv with a service's environment file loaded (as root: the file is 0600)."""
    return host.run(
        "sh -c %s probe %s " + " ".join(["%s"] * len(argv)),
        f'set -a; . {env_file}; shift; exec "$@"',
        "probe",
        *argv,
    )


def psql_as_app(db, sql, env=()):
    """psql as the database writer connects (its env file), with env overrides (VAR=value)."""
    return run_with_env(
        db,
        f"{ENV_DIR}/iot-db-consumer.env",
        ["env", *env, "psql", "-X", "-A", "-t", "-q", "-c", sql],
    )


def kafka_probe(ml, kafka_host, *args):
    result = run_with_env(
        ml,
        f"{ENV_DIR}/iot-inference-consumer.env",
        [VENV_PYTHON, "-c", KAFKA_PROBE, f"{kafka_host}:9092", *args],
    )
    assert result.rc == 0, result.stderr
    return result.stdout.strip()


def test_rows_arrive_complete_over_tls(host):
    sql = (
        f"SELECT count(*) FILTER (WHERE inferred_value IS NOT NULL AND length(data) > 0), "
        f"count(DISTINCT unique_id) FROM {TABLE}"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        result = psql_postgres(host, sql)
        assert result.rc == 0, result.stderr
        complete, distinct = (int(n) for n in result.stdout.strip().split("|"))
        if complete >= FIRST_RUN:
            break
        assert time.monotonic() < deadline, f"{complete} of {FIRST_RUN} complete rows"
        print(f"waiting for {FIRST_RUN} complete rows: {complete}")
        time.sleep(5)
    assert complete == distinct == FIRST_RUN


def test_dead_letter_topic_empty(host, kafka_host):
    kafka = tier(host, "kafka")
    result = kafka.run(
        f"{KAFKA_ENV} {KAFKA_BIN}/kafka-get-offsets.sh {ADMIN.format(kafka_host)} --topic iot-dead-letter --time -1"
    )
    assert result.rc == 0, result.stderr
    offsets = [line.rsplit(":", 2) for line in result.stdout.split()]
    assert len(offsets) == 3, result.stdout
    assert sum(int(offset) for _, _, offset in offsets) == 0


def test_each_service_has_its_scram_user(host, kafka_host):
    kafka = tier(host, "kafka")
    result = kafka.run(
        f"{KAFKA_ENV} {KAFKA_BIN}/kafka-configs.sh {ADMIN.format(kafka_host)} --describe --entity-type users"
    )
    assert result.rc == 0, result.stderr
    for user in ("iot-simulator", "iot-inference", "iot-db-writer"):
        assert f"user-principal '{user}' are SCRAM-SHA-512" in result.stdout, (
            result.stdout
        )


@pytest.mark.parametrize(
    ("group", "unit"),
    [
        ("simulator", "iot-simulator"),
        ("ml", "iot-inference-consumer"),
        ("database", "iot-db-consumer"),
    ],
)
def test_service_env_uses_sasl_ssl(host, group, unit):
    env = tier(host, group).file(f"{ENV_DIR}/{unit}.env")
    assert env.mode == 0o600
    assert 'IOT_KAFKA_SECURITY_PROTOCOL="SASL_SSL"' in env.content_string
    assert f'IOT_KAFKA_SSL_CAFILE="{CA}"' in env.content_string


def test_kafka_with_the_right_password_works(host, kafka_host):
    out = kafka_probe(tier(host, "ml"), kafka_host, "SASL_SSL")
    assert out.startswith("OK") and "iot-images" in out, out


# What kafka-python raises when it cannot get in; a configuration error would not count.
REFUSED = {
    "NoBrokersAvailable",
    "KafkaConnectionError",
    "KafkaTimeoutError",
    "SaslAuthenticationFailedError",
}


def test_kafka_refuses_plaintext(host, kafka_host):
    out = kafka_probe(tier(host, "ml"), kafka_host, "PLAINTEXT")
    print(out)
    assert out.split()[0] in REFUSED, out


def test_kafka_refuses_a_wrong_password(host, kafka_host):
    out = kafka_probe(tier(host, "ml"), kafka_host, "SASL_SSL", "not-the-password")
    print(out)
    assert out.split()[0] in REFUSED, out


def test_broker_listener_needs_a_client_certificate(host, kafka_host):
    # From the broker's own host: behind a firewall no other host reaches this port at all, and
    # the handshake, not the firewall, must be what refuses.
    kafka = tier(host, "kafka")
    result = kafka.run(
        "python3 -c %s %s %s %s", TLS_PROBE, kafka_host, "9094", "/etc/kafka/tls/ca.crt"
    )
    assert result.rc == 0, result.stderr
    print(result.stdout)
    # Not "CLOSED": Kafka also hangs up on the junk request after a successful handshake.
    assert result.stdout.startswith("REFUSED"), result.stdout
    assert "ConnectionRefusedError" not in result.stdout, result.stdout


def test_broker_listener_admits_a_broker_certificate(host, kafka_host):
    """The control for the test above: the same probe with the broker's own keystore gets in."""
    kafka = tier(host, "kafka")
    result = kafka.run(
        "python3 -c %s %s %s %s %s",
        TLS_PROBE,
        kafka_host,
        "9094",
        "/etc/kafka/tls/ca.crt",
        "/etc/kafka/tls/keystore.pem",
    )
    assert result.rc == 0, result.stderr
    print(result.stdout)
    assert result.stdout.startswith(("CLOSED", "OPEN")), result.stdout


def test_kafka_certificate_verifies(host, kafka_host):
    """The client listener's certificate chains to the pipeline CA and names the broker."""
    ml = tier(host, "ml")
    result = ml.run(
        "openssl s_client -connect %s:9092 -servername %s -CAfile %s -verify_return_error "
        "-verify_hostname %s </dev/null",
        kafka_host,
        kafka_host,
        CA,
        kafka_host,
    )
    assert "Verify return code: 0 (ok)" in result.stdout, result.stdout + result.stderr


def test_db_writer_connects_with_verify_full(host):
    env = host.file(f"{ENV_DIR}/iot-db-consumer.env").content_string
    assert 'PGSSLMODE="verify-full"' in env
    assert f'PGSSLROOTCERT="{CA}"' in env
    result = psql_as_app(
        host, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    )
    assert result.rc == 0, result.stderr
    assert result.stdout.strip() == "t"


def test_postgresql_refuses_plaintext(host):
    result = psql_as_app(host, "SELECT 1", env=["PGSSLMODE=disable"])
    assert result.rc != 0
    assert "no encryption" in result.stderr, result.stderr
    assert "no pg_hba.conf entry" in result.stderr, result.stderr


def test_app_role_cannot_open_other_databases(host):
    result = psql_as_app(host, "SELECT 1", env=["PGDATABASE=postgres"])
    assert result.rc != 0
    assert "no pg_hba.conf entry" in result.stderr, result.stderr


def test_keys_stay_private(host):
    # 15 on Debian 12, 17 on 13: the one cluster's directory, whichever it is.
    config_dir = host.check_output("ls -d /etc/postgresql/*/main")
    key = host.file(f"{config_dir}/tls/server.key")
    assert key.user == "root" and key.group == "postgres" and key.mode == 0o640
    keystore = tier(host, "kafka").file("/etc/kafka/tls/keystore.pem")
    assert (
        keystore.user == "root" and keystore.group == "kafka" and keystore.mode == 0o640
    )
