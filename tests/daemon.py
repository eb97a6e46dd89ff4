"""Run the real imagesync-daemon as a subprocess against the sandbox, and read what it did.

The daemon runs in its own session (start_new_session=True): oslo.service's parent
signals its whole process group, which must never include the test runner.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

from helpers import wait_for

RUNNING: set[Daemon] = set()  # started and not yet stopped: cleaned after each test, and at exit


def stop_leftovers() -> None:
    """Stop every daemon a test or benchmark started and did not stop (e.g. it failed)."""
    for d in list(RUNNING):
        try:
            d.stop(timeout=30)
        except AssertionError:
            pass  # stop() already killed it
        RUNNING.discard(d)


atexit.register(stop_leftovers)


class Daemon:
    def __init__(self, sandbox, workdir: Path, policy: str, options: dict | None = None):
        self.sandbox, self.dir = sandbox, Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policy_file = self.dir / "policy.yaml"
        self.policy_file.write_text(policy)
        self.ledger_path = self.dir / "ledger.sqlite"
        self.log_path = self.dir / "daemon.log"
        self.pool = f"imagesync-test-{uuid.uuid4().hex[:8]}"
        groups = {
            "DEFAULT": {"transport_url": sandbox.transport_url},
            "imagesync": {"policy_file": self.policy_file, "ledger_path": self.ledger_path,
                          "cloud": "sandbox", "clouds_file": sandbox.clouds_yaml,
                          "log_format": "json", "log_level": "DEBUG"},
            "notifications": {"pool": self.pool},
            "copy": {"poll_interval": 0.2, "backoff_base": 1, "backoff_cap": 4},
            "reconcile": {"interval": 0},
        }
        for group, values in (options or {}).items():
            groups.setdefault(group, {}).update(values)
        self.conf_file = self.dir / "imagesync.conf"
        self.conf_file.write_text("".join(
            f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in opts.items()) + "\n"
            for g, opts in groups.items()))
        self.proc: subprocess.Popen | None = None

    # -- process

    def start(self, *args: str, wait: bool = True, env: dict[str, str] | None = None) -> Daemon:
        """Start imagesync-daemon; `env` adds to (or overrides) the test runner's environment."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imagesync.cmd", "--config-file", str(self.conf_file), *args],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        RUNNING.add(self)
        if wait:
            wait_for(lambda: self.proc.poll() is not None or
                     any(e.get("event") == "imagesync started"
                         for e in self.logs(since_start=True)),
                     timeout=60, message="the daemon to start")
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.tail()}"
        return self

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 60) -> int | None:
        RUNNING.discard(self)
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"daemon ignored SIGTERM for {timeout}s:\n{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL the daemon's whole process group, parent and child, at once."""
        RUNNING.discard(self)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`imagesync ARGS` with this daemon's config, as an operator on its host runs it."""
        return subprocess.run([sys.executable, "-m", "imagesync.cli", "--config-file",
                               str(self.conf_file), *args], capture_output=True, text=True,
                              timeout=timeout)

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    # -- what it said

    def logs(self, since_start: bool = False) -> list[dict]:
        if not self.log_path.exists():
            return []
        data = self.log_path.read_bytes()
        if since_start:
            data = data[getattr(self, "_log_offset", 0):]
        out = []
        for line in data.decode(errors="replace").splitlines():
            m = re.match(r"<\d>(\{.*\})$", line)
            if m:
                try:
                    out.append(json.loads(m.group(1)))
                except ValueError:
                    pass
        return out

    def tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    # -- what it recorded

    def query(self, sql: str, *args) -> list[sqlite3.Row]:
        if not self.ledger_path.exists():
            return []
        conn = sqlite3.connect(f"{self.ledger_path.as_uri()}?mode=ro", uri=True, timeout=5)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def copies(self, image_id: str) -> dict[str, str]:
        return {r["store"]: r["state"] for r in
                self.query("SELECT store, state FROM copies WHERE image_id = ?", image_id)}

    def copy(self, image_id: str, store: str) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM copies WHERE image_id = ? AND store = ?", image_id, store)
        return rows[0] if rows else None


def role(d: Daemon) -> str | None:
    """A daemon's last coordination role ("active", "standby"), from its own log since it
    was last started."""
    found = None
    for e in d.logs(since_start=True):
        if e.get("event") in ("coordination: active", "coordination: standby"):
            found = e["event"].split(": ")[1]
    return found


def the_active(daemons: list[Daemon]) -> Daemon | None:
    """The one running daemon whose log says it is active; None unless exactly one."""
    alive = [d for d in daemons if d.proc is not None and d.proc.poll() is None]
    active = [d for d in alive if role(d) == "active"]
    return active[0] if len(active) == 1 else None


def import_requests(sandbox, image_id: str) -> int:
    """copy-image requests Glance received for one image, read from the access logs of every
    Glance API node."""
    import sandbox as sandbox_mod

    pattern = f"POST /v2/images/{image_id}/import "
    return sum(1 for node in sandbox_mod.NODES
               for line in sandbox.node_log(node).read_text(errors="replace").splitlines()
               if pattern in line)
