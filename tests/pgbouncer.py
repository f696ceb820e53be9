"""A throwaway PgBouncer (Debian's ``pgbouncer``) in transaction pooling mode, for the tests.

``PgBouncer(backend_host, backend_port)`` writes a config into a temporary directory, starts
``pgbouncer`` on a free 127.0.0.1 port in front of that server (every database name is passed
through) and stops it on ``stop()``. PgBouncer refuses to run as root, so under root it runs as
the ``postgres`` system user through ``runuser``. Trust authentication, like the test servers.
"""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

RUN_AS = "postgres"


class PgBouncerUnavailable(RuntimeError):
    """The ``pgbouncer`` binary (or the user to run it as) is missing."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class PgBouncer:
    """One PgBouncer process; ``url(db)`` reaches database ``db`` through it."""

    def __init__(
        self, backend_host: str, backend_port: int, *, pool_mode: str = "transaction"
    ) -> None:
        binary = shutil.which("pgbouncer") or (
            "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
        )
        if binary is None:
            raise PgBouncerUnavailable("no pgbouncer binary (Debian package 'pgbouncer')")
        self.binary = binary
        self.run_as: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(RUN_AS)
            except KeyError as exc:
                raise PgBouncerUnavailable(f"running as root and no {RUN_AS!r} user") from exc
            self.run_as = RUN_AS
        self.root = Path(tempfile.mkdtemp(prefix="asyncstore-pgbouncer-"))
        self.port = _free_port()
        self.log = self.root / "pgbouncer.log"
        self.pidfile = self.root / "pgbouncer.pid"
        self.process: subprocess.Popen[bytes] | None = None
        (self.root / "users.txt").write_text('"postgres" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={backend_host} port={backend_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'users.txt'}\n"
            f"pool_mode = {pool_mode}\n"
            "max_client_conn = 1000\n"
            # Few server connections per database: the shared test server's max_connections
            # is shared by every helper, and multiplexing is what this pooler is for.
            "default_pool_size = 8\n"
            "reserve_pool_size = 0\n"
            f"logfile = {self.log}\n"
            f"pidfile = {self.pidfile}\n"
            "admin_users = postgres\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
            "ignore_startup_parameters = extra_float_digits\n"
        )
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        command = [self.binary, str(self.root / "pgbouncer.ini")]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        # Output to nowhere: PgBouncer also writes its log to stderr, and a pipe nobody
        # reads fills up and blocks it (every client then hangs). The log file has it all.
        # PgBouncer built with systemd support (Debian's is) sends READY=1 to $NOTIFY_SOCKET
        # once it listens: wait on that datagram, or on the process's exit (a pidfd).
        notify_path = self.root / "notify.sock"
        notify_path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ready:
            ready.bind(str(notify_path))
            if self.run_as is not None:
                entry = pwd.getpwnam(self.run_as)
                os.chown(notify_path, entry.pw_uid, entry.pw_gid)
            self.process = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            )
            exited = os.pidfd_open(self.process.pid)
            try:
                self._wait_ready(ready, exited)
            finally:
                os.close(exited)
        if not _accepts(self.port):  # READY=1 comes after the listening socket is open
            raise RuntimeError(f"pgbouncer is ready but not listening\n{self.log_tail()}")

    def _wait_ready(self, ready: socket.socket, exited: int) -> None:
        deadline = time.monotonic() + 30
        while True:
            left = max(deadline - time.monotonic(), 0.0)
            readable, _, _ = select.select([ready, exited], [], [], left)
            if ready in readable:
                if b"READY=1" in ready.recv(4096).splitlines():
                    return
                continue  # a STATUS= line: not ready yet
            if exited in readable:
                assert self.process is not None
                self.process.wait()
                raise RuntimeError(
                    f"pgbouncer exited ({self.process.returncode}):\n{self.log_tail()}"
                )
            raise RuntimeError(
                f"pgbouncer sent no READY=1 to $NOTIFY_SOCKET within 30 s (built without "
                f"systemd support?)\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGINT)  # immediate shutdown
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout=10)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
