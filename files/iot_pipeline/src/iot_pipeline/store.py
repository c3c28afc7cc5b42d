"""PostgreSQL side of the pipeline: the ``iot_image_data`` schema and its batched UPSERTs.

An image and its result may arrive in either order; both are UPSERTs on ``unique_id`` that
touch only their own columns, so either order ends in one complete row, and a redelivered
message rewrites the same values (idempotent).

What the database refuses is told apart by its error: an outage (connection lost, server shut
down, a read-only standby, grants or table missing) is :class:`StoreUnavailable`, retried and never
dead-lettered; a value it cannot take (a data error, a constraint) is :class:`RecordRefused`, and
:func:`write_isolating` bisects the batch to find the refused records and stores all the others.
The text columns are unbounded ``text``; messages.py caps every text field at 200 characters
and rejects what PostgreSQL would refuse before it gets here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import psycopg2
import psycopg2.errorcodes
import psycopg2.errors
from psycopg2.extensions import connection
from psycopg2.extras import execute_values

from iot_pipeline.messages import ImageMessage, InvalidMessage, Message, ResultMessage

log = logging.getLogger(__name__)

TABLE = "iot_image_data"

# Append-only: each entry migrates the schema from version i to i+1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS iot_image_data (
        id               serial PRIMARY KEY,
        unique_id        text NOT NULL UNIQUE,
        device_id        text,
        ground_truth     text,
        data             bytea,
        inferred_value   text,
        inference_score  real,
        model_name       text,
        produced_at      timestamptz,
        inferred_at      timestamptz,
        image_stored_at  timestamptz,
        result_stored_at timestamptz
    );
    CREATE INDEX IF NOT EXISTS iot_image_data_pending_idx
        ON iot_image_data (id) WHERE inferred_value IS NULL;
    """,
    # 2: the version of the model that classified the row (the result's model_version; NULL for
    # results of an inference consumer that predates it). Adding a nullable column without a
    # default only touches the catalogue, so it is instant on a full table.
    """
    ALTER TABLE iot_image_data ADD COLUMN IF NOT EXISTS model_version text;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
REQUIRED_COLUMNS = frozenset({
    "id", "unique_id", "device_id", "ground_truth", "data", "inferred_value", "inference_score",
    "model_name", "model_version", "produced_at", "inferred_at", "image_stored_at",
    "result_stored_at",
})

UPSERT_IMAGES = """
INSERT INTO iot_image_data AS t
    (unique_id, device_id, ground_truth, data, produced_at, image_stored_at)
VALUES %s
ON CONFLICT (unique_id) DO UPDATE SET
    device_id = EXCLUDED.device_id,
    ground_truth = EXCLUDED.ground_truth,
    data = EXCLUDED.data,
    produced_at = EXCLUDED.produced_at,
    image_stored_at = COALESCE(t.image_stored_at, EXCLUDED.image_stored_at)
"""
UPSERT_IMAGES_TEMPLATE = "(%s, %s, %s, %s, %s, clock_timestamp())"

UPSERT_RESULTS = """
INSERT INTO iot_image_data AS t
    (unique_id, inferred_value, inference_score, model_name, model_version, inferred_at,
     result_stored_at)
VALUES %s
ON CONFLICT (unique_id) DO UPDATE SET
    inferred_value = EXCLUDED.inferred_value,
    inference_score = EXCLUDED.inference_score,
    model_name = EXCLUDED.model_name,
    model_version = EXCLUDED.model_version,
    inferred_at = EXCLUDED.inferred_at,
    result_stored_at = COALESCE(t.result_stored_at, EXCLUDED.result_stored_at)
"""
UPSERT_RESULTS_TEMPLATE = "(%s, %s, %s, %s, %s, %s, clock_timestamp())"

# Appended to both UPSERTs: which rows this transaction completed (both halves stored, one of
# them now: clock_timestamp() >= now(), the transaction's start) and their produce-to-stored
# seconds, for the DB consumer's end-to-end latency histogram. A replayed message touches a row
# completed earlier and is not counted again.
RETURNING_COMPLETED = """
RETURNING t.unique_id,
    t.image_stored_at IS NOT NULL AND t.result_stored_at IS NOT NULL
        AND GREATEST(t.image_stored_at, t.result_stored_at) >= now(),
    EXTRACT(EPOCH FROM GREATEST(t.image_stored_at, t.result_stored_at) - t.produced_at)::float8
"""


class StoreUnavailable(RuntimeError):
    """PostgreSQL cannot be reached or lost the connection: retry later, lose nothing."""


class SchemaError(RuntimeError):
    """The table is missing or out of date and this role may not migrate it."""


class RecordRefused(InvalidMessage):
    """PostgreSQL refused a value of the batch: some record in it can never be stored.

    ``reason`` is ``db_`` and the SQLSTATE's name (``db_numeric_value_out_of_range``), or
    ``db_unquotable_value`` when psycopg2 itself refused to send a value (NUL in a string).
    """


# Not the record's fault: retried like a lost connection, so nothing is dead-lettered while an
# operator fixes grants or a failover promotes a standby.
_NOT_WRITABLE = (
    psycopg2.errors.InsufficientPrivilege,
    psycopg2.errors.UndefinedTable,
    psycopg2.errors.UndefinedColumn,
    psycopg2.errors.ReadOnlySqlTransaction,
)
# A value or a constraint the database will refuse however often it is sent. ValueError is what
# psycopg2 raises client-side, while quoting: NUL in a string, text that is not UTF-8.
_REFUSED = (psycopg2.DataError, psycopg2.IntegrityError, ValueError)

Tag = TypeVar("Tag")


@dataclass(frozen=True)
class WriteSummary:
    images: int
    results: int
    # Produce-to-stored seconds of each row the write completed (image and result both stored).
    completed: tuple[float, ...] = ()

    def __add__(self, other: WriteSummary) -> WriteSummary:
        return WriteSummary(self.images + other.images, self.results + other.results,
                            self.completed + other.completed)


def _refused(exc: Exception) -> RecordRefused:
    if isinstance(exc, psycopg2.Error):
        try:
            name = psycopg2.errorcodes.lookup(exc.pgcode).lower()
        except (KeyError, TypeError):
            name = type(exc).__name__.lower()
        detail = (exc.pgerror or str(exc)).strip()
    else:
        name, detail = "unquotable_value", str(exc)
    return RecordRefused(f"db_{name}", " ".join(detail.split())[:500])


def connect(dsn: str = "") -> connection:
    """Connect with ``dsn``; an empty DSN means libpq's PGHOST/PGUSER/PGPASSWORD/... variables."""
    try:
        conn = psycopg2.connect(dsn, application_name="iot-db-consumer", connect_timeout=10)
    except psycopg2.OperationalError as exc:
        raise StoreUnavailable(str(exc).strip()) from exc
    conn.autocommit = False
    return conn


def migrate(conn: connection) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; return how many migrations ran (0 if none).

    Runs under an advisory lock so that two consumers starting together do not race.
    """
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (TABLE,))
        cur.execute(
            "CREATE TABLE IF NOT EXISTS iot_schema_version ("
            " version integer NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur.execute("SELECT coalesce(max(version), 0) FROM iot_schema_version")
        current = cur.fetchone()[0]
        for version in range(current, SCHEMA_VERSION):
            log.info("migrating schema to version %d", version + 1)
            cur.execute(MIGRATIONS[version])
            cur.execute("INSERT INTO iot_schema_version (version) VALUES (%s)", (version + 1,))
    return SCHEMA_VERSION - current


def check_schema(conn: connection) -> None:
    """Raise SchemaError unless the table has every column this code writes."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
            (TABLE,),
        )
        present = {row[0] for row in cur.fetchall()}
    missing = REQUIRED_COLUMNS - present
    if missing:
        raise SchemaError(
            f"table {TABLE} lacks {', '.join(sorted(missing))}: "
            "run `db-consumer --migrate-only` as the database owner"
        )


def ensure_schema(conn: connection) -> None:
    """Migrate when allowed to; otherwise accept a schema the owner already migrated."""
    try:
        migrate(conn)
    except psycopg2.errors.InsufficientPrivilege:
        conn.rollback()
        check_schema(conn)
        log.info("schema present; this role may not migrate it, and need not")


def _latest(messages: Iterable[ImageMessage | ResultMessage]) -> list:
    """One message per unique_id (the last): one statement may not update a row twice."""
    return list({message.unique_id: message for message in messages}.values())


def write_batch(
    conn: connection,
    images: Sequence[ImageMessage],
    results: Sequence[ResultMessage],
) -> WriteSummary:
    """UPSERT a batch in one transaction (all or nothing).

    StoreUnavailable if PostgreSQL went away or the table is not writable; RecordRefused if it
    refused a value (nothing of the batch is stored then).
    """
    images = _latest(images)
    results = _latest(results)
    returned: list[tuple[str, bool, float | None]] = []
    try:
        with conn, conn.cursor() as cur:
            if images:
                returned += execute_values(cur, UPSERT_IMAGES + RETURNING_COMPLETED, [
                    (m.unique_id, m.device_id, m.ground_truth, psycopg2.Binary(m.image_png),
                     m.produced_at) for m in images
                ], template=UPSERT_IMAGES_TEMPLATE, page_size=1000, fetch=True)
            if results:
                returned += execute_values(cur, UPSERT_RESULTS + RETURNING_COMPLETED, [
                    (m.unique_id, m.inferred_value, m.score, m.model, m.model_version,
                     m.inferred_at) for m in results
                ], template=UPSERT_RESULTS_TEMPLATE, page_size=1000, fetch=True)
    except (psycopg2.OperationalError, psycopg2.InterfaceError, *_NOT_WRITABLE) as exc:
        raise StoreUnavailable(str(exc).strip()) from exc
    except _REFUSED as exc:
        raise _refused(exc) from exc
    # A row completed by the images statement is seen complete by the results one too.
    completed = {uid: seconds for uid, done, seconds in returned if done and seconds is not None}
    return WriteSummary(len(images), len(results), tuple(completed.values()))


def write_isolating(
    conn: connection,
    tagged: Sequence[tuple[Tag, Message]],
) -> tuple[WriteSummary, list[tuple[Tag, RecordRefused]]]:
    """UPSERT ``(tag, message)`` pairs, storing all but the ones PostgreSQL refuses.

    The whole batch is one transaction while nothing is refused; on a refusal it is halved and
    each half written on its own, down to the single refused records, which come back with the
    database's error (k bad records among n cost about 2k*log2(n) transactions). Halves keep the
    batch's order, so the last message for a unique_id still wins. StoreUnavailable passes through:
    the caller retries the batch, and the halves already committed are rewritten harmlessly.
    """
    if not tagged:
        return WriteSummary(0, 0), []
    try:
        return write_batch(
            conn,
            [m for _, m in tagged if isinstance(m, ImageMessage)],
            [m for _, m in tagged if isinstance(m, ResultMessage)],
        ), []
    except RecordRefused as exc:
        if len(tagged) == 1:
            return WriteSummary(0, 0), [(tagged[0][0], exc)]
        log.info("PostgreSQL refused a value among %d records (%s): bisecting", len(tagged), exc)
    middle = len(tagged) // 2
    left, left_refused = write_isolating(conn, tagged[:middle])
    right, right_refused = write_isolating(conn, tagged[middle:])
    return left + right, left_refused + right_refused
