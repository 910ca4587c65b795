"""The SQLite write lock: writers in several processes queue for it and none fails."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlmodel import select

from hitl_mail.models import AuditEvent
from hitl_mail.store import Store, audit_event

pytestmark = pytest.mark.sqlite_only


def test_a_writer_waits_for_a_write_lock_held_elsewhere_and_then_commits(tmp_path: Path) -> None:
    path = tmp_path / "hitl.db"
    store = Store(f"sqlite:///{path}")
    store.migrate()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # as another process's transaction would
    released = threading.Event()

    def release() -> None:
        time.sleep(0.3)
        released.set()
        other.execute("COMMIT")

    holder = threading.Thread(target=release)
    holder.start()
    try:
        store.add(audit_event(None, "written", "test"))
        assert released.is_set(), "the write went through while another held the lock"
    finally:
        holder.join()
        other.close()
    with store.session() as session:
        assert [e.event for e in session.exec(select(AuditEvent))] == ["written"]
    store.close()


def test_many_threads_writing_at_once_all_commit(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'hitl.db'}")
    store.migrate()
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(20):
                store.add(audit_event(None, f"w{n}-{i}", "test"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with store.session() as session:
        assert len(list(session.exec(select(AuditEvent)))) == 160
    store.close()
