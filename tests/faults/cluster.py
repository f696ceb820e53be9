"""A throwaway Postgres cluster owned by the fault tests: initdb, start, stop, restart, remove.

The server binaries are found with ``pg_config --bindir``. initdb refuses to run as root, so
when the tests run as root every server command runs as the ``postgres`` system user through
``runuser``, in a temporary directory that user owns. The cluster listens on 127.0.0.1 only, on
a free port, with its socket in its own directory and fsync off (it holds nothing worth
keeping). Every command is synchronous; async tests call them in a worker thread.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SERVER_USER = "postgres"


class ClusterUnavailable(RuntimeError):
    """The server binaries (or the user to run them as) are missing on this machine."""


def find_bindir() -> Path:
    """The directory of ``initdb``/``pg_ctl``, or ``ClusterUnavailable`` saying why not."""
    pg_config = shutil.which("pg_config")
    candidates: list[Path] = []
    if pg_config is not None:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False, timeout=30
        )
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    # Debian's pg_config may come from libpq-dev and point at /usr/bin, which has no initdb.
    candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    raise ClusterUnavailable(
        "no Postgres server binaries (initdb, pg_ctl): pg_config --bindir gave "
        f"{[str(c) for c in candidates] or 'nothing'}"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """One Postgres cluster in a temporary directory; ``url()`` reaches it over TCP."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.run_as: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(SERVER_USER)
            except KeyError as exc:
                raise ClusterUnavailable(
                    f"running as root and there is no {SERVER_USER!r} user to run initdb as"
                ) from exc
            if shutil.which("runuser") is None:
                raise ClusterUnavailable("running as root and runuser is missing")
            self.run_as = SERVER_USER
        self.root = Path(tempfile.mkdtemp(prefix="asyncstore-faults-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.running = False
        self.sockets.mkdir()
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            for path in (self.root, self.sockets):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def url(self, database: str = "postgres", port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120.0) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}\n"
                f"{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def init(self) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip

    def start(self) -> None:
        """Start the server and wait until it accepts connections (``pg_ctl start -w``)."""
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log),
                  "-o", options)  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect every client at once) and wait for it."""
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data))
        self.running = False

    def remove(self) -> None:
        """Stop the server if it runs (immediately) and delete the directory."""
        try:
            if self.running or (self.data / "postmaster.pid").exists():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
