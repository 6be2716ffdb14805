"""SQLite history of runs and variant records ($WORKBENCH_HOME/history.sqlite, WAL mode).

The schema evolves through MIGRATIONS, applied in order and recorded in `schema_migrations`
(the simonw/llm pattern). Each variant record is stored as soon as it is measured, so a crash or
a cancel later in the run keeps what was already measured.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

from workbench.paths import history_db

MIGRATIONS: list[str] = [
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        name TEXT NOT NULL,
        model TEXT NOT NULL,
        status TEXT NOT NULL,
        out_dir TEXT,
        run_json TEXT NOT NULL
    );
    CREATE TABLE variants (
        run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        name TEXT NOT NULL,
        method TEXT NOT NULL,
        status TEXT NOT NULL,
        error TEXT,
        record_json TEXT NOT NULL,
        PRIMARY KEY (run_id, name)
    );
    """,
    """
    CREATE TABLE votes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at TEXT NOT NULL,
        run_id TEXT NOT NULL,
        prompt TEXT NOT NULL,
        variant_a TEXT NOT NULL,
        variant_b TEXT NOT NULL,
        winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie'))
    );
    """,
    # Who runs a run (host, pid and the pid's start time, so a reused pid is not mistaken for the owner),
    # and which app visitor started it (a gradio session; NULL from the CLI).
    """
    ALTER TABLE runs ADD COLUMN owner_host TEXT;
    ALTER TABLE runs ADD COLUMN owner_pid INTEGER;
    ALTER TABLE runs ADD COLUMN owner_start TEXT;
    ALTER TABLE runs ADD COLUMN visitor TEXT;
    """,
    # Which app visitor cast a blind vote (a gradio session; NULL from older rows): a shared app shows each
    # visitor only their own votes.
    """
    ALTER TABLE votes ADD COLUMN visitor TEXT;
    """,
]


class History:
    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else history_db()
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        self.interrupted = self.mark_interrupted()  # runs whose process died (kill -9, a crash) without finishing

    def _migrate(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)")
        applied = {row[0] for row in self.db.execute("SELECT version FROM schema_migrations")}
        for version, script in enumerate(MIGRATIONS, start=1):
            if version in applied:
                continue
            # One transaction per migration: a failure leaves the schema at the previous version.
            self.db.executescript(f"BEGIN; {script}; INSERT INTO schema_migrations VALUES ({version}, '{_now()}'); COMMIT;")

    def schema_version(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])

    def start_run(self, run: dict[str, Any], out_dir: Path, visitor: str | None = None) -> None:
        pid = os.getpid()
        with self.db:
            self.db.execute(
                "INSERT INTO runs (run_id, created_at, name, model, status, out_dir, run_json, owner_host, owner_pid, "
                "owner_start, visitor) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (run["run_id"], run["created_at"], run["preset"]["name"], run["model"]["source"], "running",
                 str(out_dir), json.dumps(_without_variants(run)), socket.gethostname(), pid, process_start(pid), visitor),
            )

    def mark_interrupted(self) -> list[str]:
        """Runs still 'running' whose owner process on this host is gone become 'interrupted' (history and
        results.json). Runs owned by another host are left alone: their process cannot be seen from here."""
        rows = self.db.execute("SELECT run_id, owner_pid, owner_start, out_dir FROM runs "
                               "WHERE status = 'running' AND owner_host = ?", (socket.gethostname(),)).fetchall()
        gone = [row for row in rows if not owner_alive(row["owner_pid"], row["owner_start"])]
        for row in gone:
            run = self.load_run(row["run_id"])
            if run is None:
                continue
            run["status"] = "interrupted"
            run["interrupted"] = (f"its process (pid {row['owner_pid']}) ended without finishing the run "
                                  f"(killed or crashed); found at {_now()}")
            with self.db:
                self.db.execute("UPDATE runs SET status = 'interrupted', run_json = ? WHERE run_id = ? AND status = 'running'",
                                (json.dumps(_without_variants(run)), row["run_id"]))
            _write_results(Path(row["out_dir"]) if row["out_dir"] else None, run)
        return [row["run_id"] for row in gone]

    def save_variant(self, run_id: str, position: int, record: dict[str, Any]) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO variants (run_id, position, name, method, status, error, record_json) "
                "VALUES (?,?,?,?,?,?,?)",
                (run_id, position, record["name"], record["method"], record["status"], record["error"], json.dumps(record)),
            )

    def finish_run(self, run: dict[str, Any], status: str) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET status = ?, run_json = ? WHERE run_id = ?",
                            (status, json.dumps(_without_variants(run)), run["run_id"]))

    def runs(self, visitor: str | None = None) -> list[dict[str, Any]]:
        """Every run, newest first; with `visitor`, only the runs that app visitor started."""
        where, args = ("WHERE r.visitor = ? ", (visitor,)) if visitor is not None else ("", ())
        rows = self.db.execute(
            "SELECT r.run_id, r.created_at, r.name, r.model, r.status, r.out_dir, r.visitor, "
            "COUNT(v.name) AS variants, SUM(v.status = 'ok') AS ok "
            f"FROM runs r LEFT JOIN variants v USING (run_id) {where}GROUP BY r.run_id ORDER BY r.created_at DESC", args
        )
        return [dict(row) for row in rows]

    def load_run(self, run_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT run_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        run = json.loads(row[0])
        records = self.db.execute("SELECT record_json FROM variants WHERE run_id = ? ORDER BY position", (run_id,))
        run["variants"] = [json.loads(r[0]) for r in records]
        return run

    def delete_run(self, run_id: str) -> bool:
        with self.db:
            return self.db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,)).rowcount > 0

    def add_vote(self, run_id: str, prompt: str, variant_a: str, variant_b: str, winner: str,
                 visitor: str | None = None) -> int:
        """Store one blind vote; returns its id (change_vote replaces its winner)."""
        with self.db:
            cursor = self.db.execute("INSERT INTO votes (created_at, run_id, prompt, variant_a, variant_b, winner, visitor) "
                                     "VALUES (?,?,?,?,?,?,?)", (_now(), run_id, prompt, variant_a, variant_b, winner, visitor))
            return int(cursor.lastrowid)

    def change_vote(self, vote_id: int, winner: str) -> None:
        """A second vote on the same blind answer replaces the first (one answer pair counts once)."""
        with self.db:
            self.db.execute("UPDATE votes SET winner = ? WHERE id = ?", (winner, vote_id))

    def leaderboard(self, visitor: str | None = None) -> list[dict[str, Any]]:
        """Wins, losses and ties per (run, variant) from blind votes, most wins first; with `visitor`, only that
        app visitor's votes."""
        where, args = ("WHERE visitor = ?", (visitor, visitor)) if visitor is not None else ("", ())
        rows = self.db.execute(
            f"""
            SELECT run_id, variant, SUM(result = 'win') AS wins, SUM(result = 'loss') AS losses, SUM(result = 'tie') AS ties
            FROM (
                SELECT run_id, variant_a AS variant, CASE winner WHEN 'a' THEN 'win' WHEN 'b' THEN 'loss' ELSE 'tie' END AS result FROM votes {where}
                UNION ALL
                SELECT run_id, variant_b, CASE winner WHEN 'b' THEN 'win' WHEN 'a' THEN 'loss' ELSE 'tie' END FROM votes {where}
            ) GROUP BY run_id, variant ORDER BY wins DESC, losses ASC
            """, args
        )
        return [dict(row) for row in rows]

    def close(self) -> None:
        self.db.close()


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of /proc/PID/stat (Linux); None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the command name in parentheses may hold spaces


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, None where it cannot be read."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None  # field 22 of stat


def owner_alive(pid: int | None, start: str | None) -> bool:
    if pid is None:
        return True  # a run recorded before owners were: nothing to tell, leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    fields = _proc_stat(pid)
    if fields and fields[0] in ("Z", "X"):  # a zombie: killed, its parent has not reaped it yet
        return False
    return start is None or fields is None or fields[19] == start


def _write_results(out_dir: Path | None, run: dict[str, Any]) -> None:
    """Keep results.json in step with the history; a run folder that is gone or read-only is left as it is."""
    if out_dir is None or not out_dir.is_dir():
        return
    try:
        path = out_dir / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(run, indent=1))
        tmp.replace(path)
    except OSError:
        pass


def _without_variants(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "variants"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
