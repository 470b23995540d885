"""Fixtures of the compatibility suite: a real `txmq serve` and the official Python client.

The broker binary is not built here: `TXMQ_BIN` names it (default `target/debug/txmq` under
the repository root, or under `CARGO_TARGET_DIR` when that is set). Each broker runs on
ephemeral ports in a fresh data directory; its stderr goes to a file that is printed when a
test fails. Tests use unique topic and group names, so one broker serves the whole session.
"""

import json
import logging
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

# Check-backs fast enough for tests: first after 1 s, then every 0.5 s (doubling), at most 3.
TEST_ENV = {
    "TXMQ_TRANSACTION_TIMEOUT_MS": "1000",
    "TXMQ_TRANSACTION_CHECK_INTERVAL_MS": "500",
    "TXMQ_TRANSACTION_CHECK_MAX": "3",
    "TXMQ_AUTO_CREATE_TOPICS": "true",
}

# The client logs to ~/logs/rocketmq_python only; let pytest capture its records too, so a
# failing test shows what the client saw.
logging.getLogger("rocketmq-python-client").propagate = True


def binary() -> Path:
    """The txmq binary under test."""
    if os.environ.get("TXMQ_BIN"):
        return Path(os.environ["TXMQ_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    return target / "debug" / "txmq"


class Broker:
    """A running `txmq serve`: its addresses, and the admin commands of the CLI."""

    def __init__(self, env_overrides: dict):
        self.bin = binary()
        if not self.bin.is_file():
            pytest.fail(f"txmq binary not found at {self.bin}: build it (cargo build -p txmq) or set TXMQ_BIN")
        self.dir = tempfile.TemporaryDirectory(prefix="txmq-compat-")
        self.data_dir = Path(self.dir.name) / "data"
        self.log_path = Path(self.dir.name) / "broker.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TXMQ_")}
        env.update(TEST_ENV)
        env.update(env_overrides)
        env.setdefault("RUST_LOG", "info")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(self.bin), "serve", "--data-dir", str(self.data_dir),
             "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=self.log, env=env,
        )
        self.grpc, self.http = self._read_addresses(timeout=20)

    def _read_addresses(self, timeout):
        lines: "queue.Queue[bytes]" = queue.Queue()

        def pump():
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(b"")

        threading.Thread(target=pump, daemon=True).start()
        found = {}
        deadline = time.monotonic() + timeout
        while len(found) < 2:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                pytest.fail(f"txmq serve printed no addresses within {timeout} s:\n{self.log_text()}")
            if not line:
                self.kill()
                pytest.fail(f"txmq serve exited with {self.proc.wait()} before listening:\n{self.log_text()}")
            kind, _, addr = line.decode().strip().partition(" ")
            if kind in ("grpc", "http"):
                found[kind] = addr
        return found["grpc"], found["http"]

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-20000:]

    def cli(self, *args: str, check=True) -> subprocess.CompletedProcess:
        """Runs `txmq ARGS --server HTTP`."""
        p = subprocess.run([str(self.bin), *args, "--server", self.http],
                           capture_output=True, text=True, timeout=30)
        if check and p.returncode != 0:
            raise AssertionError(f"txmq {' '.join(args)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
        return p

    def cli_json(self, *args: str):
        """Runs `txmq ARGS --json --server HTTP` and parses what it printed."""
        return json.loads(self.cli(*args, "--json").stdout)

    def topic(self, kind="normal", queues=4, prefix="t") -> str:
        """Creates a topic with a unique name and returns the name."""
        name = unique(prefix)
        self.cli("topic", "create", name, "--type", kind, "--queues", str(queues))
        return name

    def group(self, max_attempts=16, fifo=False, backoff_ms=None, prefix="g") -> str:
        """Creates a consumer group with a unique name and returns the name."""
        name = unique(prefix)
        args = ["group", "create", name, "--max-attempts", str(max_attempts)]
        if fifo:
            args.append("--fifo")
        if backoff_ms:
            args += ["--backoff-ms", ",".join(str(b) for b in backoff_ms)]
        self.cli(*args)
        return name

    def stop(self) -> int:
        """SIGTERM, then the exit code (None if it did not exit within 20 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self):
        self.kill()
        self.log.close()
        self.dir.cleanup()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _start(env_overrides):
    b = Broker(env_overrides)
    return b


def _finish(b: Broker):
    try:
        code = b.stop()
        assert code == 0, f"txmq serve did not exit 0 within 20 s after SIGTERM (got {code}):\n{b.log_text()}"
    finally:
        b.close()


@pytest.fixture(scope="session")
def broker():
    """One broker for the session, with fast check-backs and topics created on first send."""
    b = _start({})
    yield b
    _finish(b)


@pytest.fixture
def strict_broker():
    """A broker of its own that does not create topics on first send."""
    b = _start({"TXMQ_AUTO_CREATE_TOPICS": "false"})
    yield b
    _finish(b)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attaches the broker's log to a failed test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name in ("broker", "strict_broker"):
            b = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if isinstance(b, Broker):
                report.sections.append((f"{name} log (tail)", b.log_text()[-6000:]))


@pytest.fixture
def clients():
    """Starts clients and shuts them all down after the test, whatever happened."""
    started = []

    def start(client):
        client.startup()
        started.append(client)
        return client

    yield start
    for c in reversed(started):
        try:
            c.shutdown()
        except Exception as e:  # a failed shutdown must not hide the test's own result
            logging.getLogger(__name__).warning("shutdown of %s failed: %s", c, e)
