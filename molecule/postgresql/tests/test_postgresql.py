"""Testinfra checks for the postgresql role scenario: service, port, and the owner/app privilege split."""

import pytest

testinfra_hosts = ["ansible://database"]

# Must match the fixtures in molecule.yml.
OWNER = ("iot_owner", "molecule-owner-secret")
APP = ("iot_app", "molecule-app-secret")
TABLE = "molecule_readings"


def psql(host, role, sql, address="127.0.0.1"):
    user, password = role
    return host.run(
        f"PGPASSWORD={password} psql -h {address} -U {user} -d iot "
        f"-v ON_ERROR_STOP=1 -XAtc {sql!r}"
    )


@pytest.fixture(scope="module")
def owner_table(host):
    """The owner creates a table after the role ran, as db-consumer --migrate-only does."""
    result = psql(
        host,
        OWNER,
        f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (id serial PRIMARY KEY, value text NOT NULL)",
    )
    assert result.rc == 0, result.stderr
    return TABLE


def test_service_enabled_and_running(host):
    assert host.service("postgresql").is_enabled
    assert host.service("postgresql@15-main").is_running


def test_listens_on_all_addresses(host):
    assert host.socket("tcp://0.0.0.0:5432").is_listening


def test_app_inserts_and_selects_owner_table(host, owner_table):
    inserted = psql(
        host, APP, f"INSERT INTO {owner_table} (value) VALUES ('hello') RETURNING id"
    )
    assert inserted.rc == 0, inserted.stderr
    row_id = inserted.stdout.strip().splitlines()[0]
    updated = psql(
        host, APP, f"UPDATE {owner_table} SET value = 'world' WHERE id = {row_id}"
    )
    assert updated.rc == 0, updated.stderr
    selected = psql(host, APP, f"SELECT value FROM {owner_table} WHERE id = {row_id}")
    assert selected.stdout.strip() == "world"


def test_app_connects_over_own_address(host, owner_table):
    address = host.ansible("setup")["ansible_facts"]["ansible_default_ipv4"]["address"]
    selected = psql(host, APP, f"SELECT count(*) FROM {owner_table}", address=address)
    assert selected.rc == 0, selected.stderr


def test_app_cannot_create_table(host):
    result = psql(host, APP, "CREATE TABLE app_must_not_create (id int)")
    assert result.rc != 0
    assert "permission denied for schema public" in result.stderr


def test_app_cannot_delete(host, owner_table):
    result = psql(host, APP, f"DELETE FROM {owner_table}")
    assert result.rc != 0
    assert "permission denied" in result.stderr


def test_wrong_password_rejected(host):
    result = psql(host, ("iot_app", "not-the-password"), "SELECT 1")
    assert result.rc != 0
    assert "password authentication failed" in result.stderr


def test_owner_cannot_connect_from_outside_localhost(host):
    address = host.ansible("setup")["ansible_facts"]["ansible_default_ipv4"]["address"]
    result = psql(host, OWNER, "SELECT 1", address=address)
    assert result.rc != 0
    assert "no pg_hba.conf entry" in result.stderr
