"""A primary and a synchronous streaming standby, built on this machine for the switchover test.

``Node`` is a ``tests.faults.cluster.Cluster`` that can also be made from another node with
``pg_basebackup -R`` (a standby streaming from it) and promoted. The primary waits for the
standby on every commit (``synchronous_standby_names`` names the standby's walreceiver,
``synchronous_commit = on``), so a commit acknowledged to a caller is on the standby too.
fsync stays off: nothing here survives an operating-system crash, and none is simulated.
"""

from __future__ import annotations

from pathlib import Path

from tests.faults.cluster import Cluster

STANDBY_NAME = "asyncstore_standby"


class Node(Cluster):
    def __init__(self, bindir: Path, *, extra_options: str = "") -> None:
        super().__init__(bindir)
        self.extra_options = extra_options

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off"
            " -c full_page_writes=off -c max_connections=200 -c wal_level=replica"
            f" -c max_wal_senders=5 -c hot_standby=on -c cluster_name={STANDBY_NAME}"
            f" {self.extra_options}"
        )
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log),
                  "-o", options)  # fmt: skip
        self.running = True

    def clone_from(self, primary: Node) -> None:
        """Make this node a standby of ``primary`` (``pg_basebackup -R``: streaming, with
        its ``primary_conninfo``), not started yet."""
        self._run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(self.data), "-R", "-X", "stream", "-c", "fast", "--no-sync",
        )  # fmt: skip

    def promote(self) -> None:
        """End recovery: the standby becomes a primary (``pg_ctl promote -w``)."""
        self._run("pg_ctl", "promote", "-w", "-t", "60", "-D", str(self.data))


def primary_options() -> str:
    # The walreceiver's application_name is its cluster_name: the standby is named there.
    return f"-c synchronous_commit=on -c synchronous_standby_names={STANDBY_NAME}"


def multi_host_url(primary: Node, standby: Node, database: str) -> str:
    """The multi-host DSN both nodes serve: whichever accepts writes is used."""
    return (
        f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{database}"
        "?target_session_attrs=read-write"
    )
