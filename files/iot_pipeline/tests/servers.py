"""Real Kafka and PostgreSQL for the integration tests, run from local binaries (no mocks)."""

from __future__ import annotations

import base64
import contextlib
import glob
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from kafka import KafkaAdminClient
from psycopg2 import sql

log = logging.getLogger(__name__)

# files/iot_pipeline/tests -> repository root
REPO_ROOT = Path(__file__).resolve().parents[3]
KAFKA_VERSION = os.environ.get("IOT_TEST_KAFKA_VERSION", "4.1.1")
KAFKA_CACHE_DIR = Path(os.environ.get("KAFKA_CACHE_DIR", REPO_ROOT / ".cache" / "kafka"))
KAFKA_BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-kafka-archive.sh"
# Small heap: the machine is shared, and a test broker holds a few kilobytes of data.
KAFKA_HEAP_OPTS = os.environ.get("IOT_TEST_KAFKA_HEAP_OPTS", "-Xmx512m -Xms128m")
POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"
POSTGRES_SUPERUSER = "postgres"


class ServerError(RuntimeError):
    """A test server could not be provided; the message says what to do about it."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


# --------------------------------------------------------------------------- Kafka


def kafka_archive(version: str = KAFKA_VERSION) -> Path:
    """The offline Kafka archive; built with scripts/build-kafka-archive.sh when missing."""
    archive = KAFKA_CACHE_DIR / f"kafka_2.13-{version}.tgz"
    if not archive.exists():
        log.info("building %s with %s", archive, KAFKA_BUILD_SCRIPT)
        result = subprocess.run(
            [str(KAFKA_BUILD_SCRIPT), version], capture_output=True, text=True, check=False
        )
        if result.returncode != 0 or not archive.exists():
            raise ServerError(
                f"{KAFKA_BUILD_SCRIPT.name} {version} failed (exit {result.returncode}); "
                f"it needs mvn and java (apt-get install maven default-jre-headless):\n"
                f"{result.stderr[-3000:]}"
            )
    return archive


def _kafka_cluster_id() -> str:
    # What `kafka-storage.sh random-uuid` prints, without starting a JVM for it.
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


class KafkaServer:
    """A single-node KRaft Kafka (broker and controller in one process) in a private directory."""

    def __init__(self, workdir: Path, version: str = KAFKA_VERSION) -> None:
        self.workdir = workdir
        self.version = version
        self.port = free_port()
        self.controller_port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_file = workdir / "broker.out"
        self.home = workdir / f"kafka_2.13-{version}"
        self._process: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> Path:
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            # Static quorum: formats and starts the same way on Kafka 3.9 and 4.x.
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.bootstrap}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.workdir / "data"),
            "num.partitions": "3",
            "offsets.topic.replication.factor": "1",
            # Fewer internal partitions than the default 50: the first group is ready sooner.
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "3",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
        }
        if int(self.version.split(".")[0]) >= 4:
            settings["share.coordinator.state.topic.replication.factor"] = "1"
            settings["share.coordinator.state.topic.min.isr"] = "1"
        config = self.workdir / "server.properties"
        config.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        return config

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KAFKA_HEAP_OPTS"] = KAFKA_HEAP_OPTS
        env["LOG_DIR"] = str(self.workdir / "logs")
        return env

    def start(self, timeout: float = 120.0) -> str:
        """Extract, format and start the broker; return its address once it serves requests."""
        with tarfile.open(kafka_archive(self.version)) as archive:
            archive.extractall(self.workdir, filter="tar")
        config = self._write_config()
        storage = self.home / "bin" / "kafka-storage.sh"
        result = subprocess.run(
            [str(storage), "format", "-t", _kafka_cluster_id(), "-c", str(config)],
            capture_output=True,
            text=True,
            env=self._env(),
            check=False,
        )
        if result.returncode != 0:
            raise ServerError(f"kafka-storage.sh format failed:\n{result.stdout}\n{result.stderr}")

        with self.log_file.open("wb") as out:
            # kafka-server-start.sh execs the JVM, so this pid is the broker's own.
            self._process = subprocess.Popen(
                [str(self.home / "bin" / "kafka-server-start.sh"), str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )
        self._wait_ready(timeout)
        return self.bootstrap

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise ServerError(
                    f"Kafka exited with {self._process.returncode} during start-up; "
                    f"last lines of {self.log_file}:\n{_tail(self.log_file)}"
                )
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap,
                    bootstrap_timeout_ms=2000,
                    request_timeout_ms=5000,
                )
                try:
                    # A broker answers before the controller has unfenced it; wait for that.
                    if admin.describe_cluster().get("brokers"):
                        return
                finally:
                    admin.close()
            except Exception as exc:  # any failure here means "not ready yet"
                last_error = exc
            time.sleep(0.5)
        self.stop()
        raise ServerError(
            f"Kafka did not answer on {self.bootstrap} within {timeout:.0f}s ({last_error!r}); "
            f"last lines of {self.log_file}:\n{_tail(self.log_file)}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if the broker has not exited in time."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("Kafka did not stop within %.0fs; killing it", timeout)
            process.kill()
            process.wait(10)


@dataclass(frozen=True)
class Topics:
    """Per-test topic names, so tests never read each other's messages."""

    images: str
    results: str
    dlq: str

    @property
    def names(self) -> list[str]:
        return [self.images, self.results, self.dlq]

    def as_env(self) -> dict[str, str]:
        """The topics as the services' environment variables (see the project contract)."""
        return {
            "IOT_IMAGES_TOPIC": self.images,
            "IOT_RESULTS_TOPIC": self.results,
            "IOT_DLQ_TOPIC": self.dlq,
        }


def unique_topics(prefix: str = "test") -> Topics:
    suffix = uuid.uuid4().hex[:12]
    return Topics(
        images=f"{prefix}-images-{suffix}",
        results=f"{prefix}-results-{suffix}",
        dlq=f"{prefix}-dead-letter-{suffix}",
    )


def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    """Create the topics and return once every partition has a leader."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    try:
        admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": 1} for name in names},
            timeout_ms=30000,
            wait_for_metadata=True,
        )
    finally:
        admin.close()


def delete_topics(bootstrap: str, names: list[str]) -> None:
    """Best effort: a leftover topic only costs the session broker a few files."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    except Exception as exc:
        log.warning("could not connect to delete topics %s: %r", names, exc)
        return
    try:
        admin.delete_topics(names, timeout_ms=10000, raise_errors=False)
    finally:
        admin.close()


# --------------------------------------------------------------------------- PostgreSQL


def postgres_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/N/bin that has initdb and pg_ctl."""

    def major(path: str) -> int:
        match = re.search(r"/postgresql/(\d+)/bin$", path)
        return int(match.group(1)) if match else -1

    for candidate in sorted(glob.glob(POSTGRES_BIN_GLOB), key=major, reverse=True):
        if all(os.access(Path(candidate) / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return Path(candidate)
    raise ServerError(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found in {POSTGRES_BIN_GLOB}; "
        "install them with `apt-get install postgresql` (the integration tests need a real server)."
    )


def _service_user() -> str | None:
    """Who runs PostgreSQL: None for the current user, or a system user when we are root."""
    if os.geteuid() != 0:
        return None
    # PostgreSQL refuses to run as root. Debian's package creates `postgres`; `nobody` is universal.
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise ServerError(
        "running as root and neither a `postgres` nor a `nobody` user exists to run PostgreSQL"
    )


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1, trust auth, socket in its own directory."""

    def __init__(self) -> None:
        self.bin_dir = postgres_bin_dir()
        self.user = _service_user()
        # Not under pytest's basetemp: that is mode 0700 for the test runner, which the service user
        # (when we are root) could not enter.
        self.workdir = Path(tempfile.mkdtemp(prefix="iot-pg-"))
        self.data_dir = self.workdir / "data"
        self.socket_dir = self.workdir / "socket"
        self.log_file = self.workdir / "postgres.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.superuser = POSTGRES_SUPERUSER
        self._started = False

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        env = dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8")
        result = subprocess.run(
            command, cwd=self.workdir, env=env, capture_output=True, text=True, check=False
        )
        if check and result.returncode != 0:
            raise ServerError(
                f"{' '.join(command)} failed with {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}\n{_tail(self.log_file)}"
            )
        return result

    def start(self) -> None:
        self.socket_dir.mkdir()
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in (self.workdir, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(self.workdir, 0o700)
        self._run(
            "initdb",
            "--pgdata",
            str(self.data_dir),
            "--username",
            self.superuser,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        )
        # Durability is pointless for a test cluster; these keep it fast on a shared machine.
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses={self.host} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        self._run(
            "pg_ctl",
            "--pgdata",
            str(self.data_dir),
            "--log",
            str(self.log_file),
            "--options",
            options,
            "--wait",
            "--timeout",
            "60",
            "start",
        )
        self._started = True

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection string for the superuser."""
        return f"host={self.host} port={self.port} dbname={dbname} user={self.superuser}"

    def create_database(self, name: str) -> str:
        """Create an empty database and return its DSN."""
        conn = psycopg2.connect(self.dsn())
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        conn = psycopg2.connect(self.dsn())
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                # FORCE ends connections a test left open (PostgreSQL 13+).
                cur.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        finally:
            conn.close()

    def stop(self) -> None:
        if self._started:
            result = self._run(
                "pg_ctl",
                "--pgdata",
                str(self.data_dir),
                "--mode",
                "fast",
                "--wait",
                "--timeout",
                "30",
                "stop",
                check=False,
            )
            if result.returncode != 0:
                self._kill_postmaster()
            self._started = False
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        log.warning("pg_ctl stop failed; killing postmaster %d", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
