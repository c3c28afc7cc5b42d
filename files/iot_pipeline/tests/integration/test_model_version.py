"""The model version of each row on a real PostgreSQL: schema migration 2 (``model_version``)
over a table of schema 1 that already holds rows, the app role's check of an unmigrated table,
and the version stored with each result."""

import dataclasses

import pytest

from iot_pipeline import store

from harness import image_message, result_message

pytestmark = pytest.mark.integration


def schema_1(conn) -> None:
    """The table as a DB consumer of schema version 1 left it, with one complete row."""
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE iot_schema_version ("
                    " version integer NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        cur.execute(store.MIGRATIONS[0])
        cur.execute("INSERT INTO iot_schema_version (version) VALUES (1)")
        cur.execute("INSERT INTO iot_image_data (unique_id, inferred_value, model_name)"
                    " VALUES ('before', 'apple', 'resnet50-cifar100')")


def columns(conn) -> set[str]:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT column_name FROM information_schema.columns"
                    " WHERE table_name = 'iot_image_data'")
        return {row[0] for row in cur.fetchall()}


def test_schema_1_migrates_to_2_keeping_its_rows(pg_dsn):
    conn = store.connect(pg_dsn)
    try:
        schema_1(conn)
        assert "model_version" not in columns(conn)
        assert store.migrate(conn) == store.SCHEMA_VERSION - 1 == 1
        assert store.migrate(conn) == 0
        assert "model_version" in columns(conn)
        store.check_schema(conn)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT max(version) FROM iot_schema_version")
            assert cur.fetchone()[0] == 2
            cur.execute("SELECT unique_id, inferred_value, model_name, model_version"
                        " FROM iot_image_data")
            assert cur.fetchall() == [("before", "apple", "resnet50-cifar100", None)]
    finally:
        conn.close()


def test_the_app_role_on_an_unmigrated_table_is_told_to_migrate(pg_dsn):
    conn = store.connect(pg_dsn)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE ROLE version_app LOGIN PASSWORD 'pw'")
    try:
        schema_1(conn)
        with conn, conn.cursor() as cur:
            cur.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            cur.execute("GRANT SELECT, INSERT, UPDATE ON iot_image_data TO version_app")
            cur.execute("GRANT SELECT ON iot_schema_version TO version_app")
        app = store.connect(f"{pg_dsn} user=version_app password=pw")
        try:
            with pytest.raises(store.SchemaError, match=r"lacks model_version.*--migrate-only"):
                store.ensure_schema(app)
        finally:
            app.close()
        store.migrate(conn)  # the owner migrates: now the app role starts
        app = store.connect(f"{pg_dsn} user=version_app password=pw")
        try:
            store.ensure_schema(app)
        finally:
            app.close()
    finally:
        with conn, conn.cursor() as cur:
            cur.execute("DROP OWNED BY version_app")
            cur.execute("DROP ROLE version_app")
        conn.close()


def test_each_result_stores_its_model_version_or_null(pg_dsn):
    conn = store.connect(pg_dsn)
    try:
        store.migrate(conn)
        images = [image_message(f"img-{i}", i) for i in range(3)]
        results = [
            dataclasses.replace(result_message("img-0"), model_version="old-1"),
            dataclasses.replace(result_message("img-1"), model_version="new-2"),
            result_message("img-2"),  # from an inference consumer that predates the field
        ]
        store.write_batch(conn, images, results)
        # A redelivered result rewrites the row with the version it carries.
        store.write_batch(conn, [], [dataclasses.replace(result_message("img-0"),
                                                         model_version="old-1")])
        with conn, conn.cursor() as cur:
            cur.execute("SELECT unique_id, model_name, model_version FROM iot_image_data"
                        " ORDER BY unique_id")
            assert cur.fetchall() == [("img-0", "test-model", "old-1"),
                                      ("img-1", "test-model", "new-2"),
                                      ("img-2", "test-model", None)]
    finally:
        conn.close()


def test_a_missing_model_version_column_is_an_outage_not_a_bad_record(pg_dsn):
    """A consumer that runs ahead of its migration retries; it never dead-letters results."""
    conn = store.connect(pg_dsn)
    try:
        schema_1(conn)
        with pytest.raises(store.StoreUnavailable):
            store.write_batch(conn, [], [result_message("x")])
        with conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM iot_image_data WHERE unique_id = 'x'")
            assert cur.fetchone()[0] == 0
    finally:
        conn.close()

