"""The database host: PostgreSQL, the database writer, the table and the app role's rights."""

import pytest
from helpers import (
    APP_USER,
    ENV_DIR,
    MAX_EXPOSURE,
    TABLE,
    exposure,
    psql_app,
    psql_postgres,
    unit_state,
)

testinfra_hosts = ["ansible://database"]


@pytest.mark.parametrize("unit", ["postgresql", "iot-db-consumer"])
def test_service_enabled_and_active(host, unit):
    service = host.service(unit)
    assert service.is_enabled
    assert service.is_running


def test_postgresql_cluster_running_as_postgres(host):
    state = unit_state(host, "postgresql@15-main")
    assert state["ActiveState"] == "active"
    assert host.process.get(pid=int(state["MainPID"])).user == "postgres"


def test_db_consumer_runs_as_app_user(host):
    state = unit_state(host, "iot-db-consumer")
    assert state["User"] == APP_USER
    assert host.process.get(pid=int(state["MainPID"])).user == APP_USER


def test_postgresql_port_listening(host):
    assert host.socket("tcp://0.0.0.0:5432").is_listening


def test_env_file_root_only(host):
    env = host.file(f"{ENV_DIR}/iot-db-consumer.env")
    assert env.user == "root"
    assert env.mode == 0o600
    assert "PGUSER=" in env.content_string


def test_table_exists(host):
    result = psql_postgres(host, f"SELECT to_regclass('public.{TABLE}') IS NOT NULL")
    assert result.rc == 0, result.stderr
    assert result.stdout.strip() == "t"


@pytest.mark.parametrize(
    ("privilege", "granted"),
    [
        ("SELECT", True),
        ("INSERT", True),
        ("UPDATE", True),
        ("DELETE", False),
        ("TRUNCATE", False),
    ],
)
def test_app_role_table_privileges(host, privilege, granted):
    result = psql_postgres(
        host, f"SELECT has_table_privilege('iot_app', '{TABLE}', '{privilege}')"
    )
    assert result.rc == 0, result.stderr
    assert result.stdout.strip() == ("t" if granted else "f")


def test_app_role_can_read_and_write(host):
    """Connects like the service (its env file, over TCP) and writes a row it then rolls back."""
    result = psql_app(
        host,
        f"BEGIN; INSERT INTO {TABLE} (unique_id, device_id) VALUES ('molecule-probe', 'probe'); "
        f"UPDATE {TABLE} SET ground_truth = 'probe' WHERE unique_id = 'molecule-probe'; "
        f"SELECT count(*) FROM {TABLE} WHERE unique_id = 'molecule-probe'; ROLLBACK;",
    )
    assert result.rc == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_app_role_cannot_delete(host):
    result = psql_app(host, f"DELETE FROM {TABLE} WHERE unique_id = 'no-such-row'")
    assert result.rc != 0
    assert "permission denied" in result.stderr


def test_app_role_cannot_create_tables(host):
    result = psql_app(host, "CREATE TABLE molecule_probe (id int)")
    assert result.rc != 0
    assert "permission denied" in result.stderr


@pytest.mark.parametrize("database", ["postgres", "template1"])
def test_app_role_cannot_open_other_databases(host, database):
    """pg_hba admits iot_app to its own database only; the others refuse the connection."""
    result = psql_app(host, "SELECT 1", database=database)
    assert result.rc != 0
    assert "no pg_hba.conf entry" in result.stderr, result.stderr


def test_db_consumer_unit_sandboxed(host):
    assert exposure(host, "iot-db-consumer") <= MAX_EXPOSURE
