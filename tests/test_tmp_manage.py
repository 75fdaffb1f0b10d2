"""utils/media/temp_files.py: scopes, TTL sweeping with a fake clock, size cap, live-scope protection, threads."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from utils.errors import PayloadTooLarge
from utils.media.temp_files import MAX_STATUS_ENTRIES, TempManager

T0 = 1_000_000.0


class FakeClock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def root(tmp_path, monkeypatch):
    # a relative root, as configured ("tmp"), resolved against the test's own folder
    monkeypatch.chdir(tmp_path)
    return Path("tmp")


def make(root, clock, **kw) -> TempManager:
    return TempManager(root, clock=clock, **kw)


def leftover(root: Path, name: str, nbytes: int, mtime: float) -> Path:
    """An entry a crashed request left behind: a scope folder holding one file, all with ``mtime``."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "upload.bin").write_bytes(b"x" * nbytes)
    for p in (folder / "upload.bin", folder):
        os.utime(p, (mtime, mtime))
    return folder


def name(i: int, request_id: str = "") -> str:
    return f"{i:032x}" + (f"-{request_id}" if request_id else "")


# ---------------------------------------------------------------- scopes


def test_scope_files_are_removed_at_exit(root, clock):
    tm = make(root, clock)
    with tm.scope("req-1") as scope:
        folder = scope.directory
        assert folder.is_dir() and folder.parent == root
        assert folder.name.endswith("-req-1") and len(folder.name) == 32 + 6
        p1 = scope.write(b"hello", suffix=".wav")
        p2 = scope.path(".mp4")
        assert p1.read_bytes() == b"hello" and p1.suffix == ".wav" and p1.parent == folder
        assert not p2.exists() and p2.parent == folder and p1 != p2
        with scope.open(".bin") as f:
            f.write(b"1234567")
        assert scope.bytes_used == 12
        assert tm.status()["active_scopes"] == 1
    assert not folder.exists() and not p1.exists()
    assert tm.status()["active_scopes"] == 0


def test_scope_removed_when_the_body_raises(root, clock):
    tm = make(root, clock)
    with pytest.raises(ZeroDivisionError):
        with tm.scope() as scope:
            folder = scope.directory
            spool = scope.open(".part")          # left open on purpose: closed by the scope
            spool.write(b"data")
            1 / 0
    assert spool.closed
    assert not folder.exists()
    assert list(root.iterdir()) == []
    assert tm.status()["active_scopes"] == 0


def test_scope_unusable_after_exit(root, clock):
    tm = make(root, clock)
    with tm.scope() as scope:
        pass
    with pytest.raises(RuntimeError):
        scope.path()
    with pytest.raises(RuntimeError):
        scope.write(b"x")


def test_names_unique_and_request_ids_sanitized(root, clock):
    tm = make(root, clock)
    with tm.scope("../../etc/passwd") as a, tm.scope("../../etc/passwd") as b, tm.scope("a b/c\\d\x00") as c:
        assert a.directory != b.directory
        for scope in (a, b, c):
            assert scope.directory.parent == root
            assert "/" not in scope.name and "\\" not in scope.name and not scope.name.startswith(".")
        assert c.name.endswith("-a_b_c_d_")
        paths = {a.path(".x") for _ in range(200)}
        assert len(paths) == 200


@pytest.mark.parametrize("suffix", ["/x", "../x", "x", ".a/b", "." + "a" * 40, ".a.b.c.d"])
def test_bad_suffixes_rejected(root, clock, suffix):
    with make(root, clock).scope() as scope:
        with pytest.raises(ValueError):
            scope.path(suffix)


def test_write_refuses_to_pass_the_total_cap(root, clock):
    tm = make(root, clock, max_total_bytes=100)
    with tm.scope() as a, tm.scope() as b:
        a.write(b"x" * 60)
        with pytest.raises(PayloadTooLarge):
            b.write(b"y" * 41)
        b.write(b"y" * 40)


# ---------------------------------------------------------------- sweeping


def test_sweep_removes_only_expired_unheld_entries(root, clock):
    tm = make(root, clock, ttl_seconds=3600)
    old = leftover(root, name(1), 10, T0 - 7200)
    young = leftover(root, name(2), 20, T0 - 60)
    result = tm.sweep()
    assert result["removed_files"] == 1 and result["removed_bytes"] == 10
    assert not old.exists() and young.exists()
    clock.now += 3600   # now the young one is past its TTL too
    assert tm.sweep()["removed_bytes"] == 20
    assert not young.exists()


def test_sweep_force_removes_young_unheld(root, clock):
    tm = make(root, clock)
    young = leftover(root, name(3), 5, T0)
    assert tm.sweep()["removed_files"] == 0
    assert tm.sweep(force=True)["removed_files"] == 1
    assert not young.exists()


def test_live_scope_never_swept(root, clock):
    tm = make(root, clock, ttl_seconds=10, max_total_bytes=1)
    with tm.scope("long") as scope:
        with scope.open(".bin") as spool:   # spooled uploads are not refused by the cap
            spool.write(b"z" * 50)
        path = Path(spool.name)
        for p in (path, scope.directory):
            os.utime(p, (T0 - 10_000, T0 - 10_000))   # far past the TTL and over the size cap
        result = tm.sweep(force=True)
        assert result["removed_files"] == 0 and result["over_cap"] is True
        assert path.read_bytes() == b"z" * 50
        assert tm.startup_sweep()["removed_files"] == 0
        assert path.exists()
    assert not scope.directory.exists()


def test_size_cap_deletes_oldest_unheld_first(root, clock):
    tm = make(root, clock, ttl_seconds=10**9, max_total_bytes=250)
    a = leftover(root, name(10), 100, T0 - 300)   # oldest
    b = leftover(root, name(11), 100, T0 - 200)
    c = leftover(root, name(12), 100, T0 - 100)
    with tm.scope() as live:
        live.write(b"L" * 100)
        os.utime(live.directory, (T0 - 1000, T0 - 1000))   # older than all, but held
        result = tm.sweep()
        # 400 bytes > 250: a and b go (oldest unheld), c and the live scope stay -> 200
        assert not a.exists() and not b.exists() and c.exists() and live.directory.exists()
        assert result["removed_for_size"] == 2 and result["remaining_bytes"] == 200
        assert result["over_cap"] is False


def test_only_managed_names_are_deleted(root, clock):
    tm = make(root, clock, ttl_seconds=1)
    root.mkdir()
    (root / ".gitkeep").write_bytes(b"")
    (root / "notes.txt").write_text("not ours")
    os.utime(root / "notes.txt", (T0 - 10_000, T0 - 10_000))
    stray = leftover(root, name(5), 1, T0 - 10_000)
    single = root / f"{6:032x}.wav"    # a managed-looking loose file is NOT a scope name: kept
    single.write_bytes(b"1")
    tm.startup_sweep()
    assert not stray.exists()
    assert (root / ".gitkeep").exists() and (root / "notes.txt").exists() and single.exists()
    entries = {e["name"]: e for e in tm.status()["entries"]}
    assert entries["notes.txt"]["managed"] is False
    assert ".gitkeep" not in entries


def test_startup_sweep_creates_root_and_clears_leftovers(root, clock):
    tm = make(root, clock)
    assert tm.startup_sweep()["removed_files"] == 0 and root.is_dir()
    for i in range(3):
        leftover(root, name(20 + i, "r"), 7, T0)        # young: a previous process's files
    result = tm.startup_sweep()
    assert result["removed_files"] == 3 and result["removed_bytes"] == 21
    assert list(root.iterdir()) == []


# ---------------------------------------------------------------- status


def test_status_fields_and_no_absolute_path(root, clock, tmp_path):
    tm = make(root, clock, ttl_seconds=60, max_total_bytes=1000)
    leftover(root, name(30), 8, T0 - 30)
    with tm.scope("abc") as scope:
        scope.write(b"q" * 4)
        status = tm.status()
    assert status["root"] == "tmp"
    assert status["files"] == 2 and status["bytes"] == 12
    assert status["active_scopes"] == 1
    assert status["oldest_age_seconds"] == pytest.approx(30)
    assert status["ttl_seconds"] == 60 and status["max_total_bytes"] == 1000
    by_name = {e["name"]: e for e in status["entries"]}
    assert by_name[name(30)]["in_use"] is False and by_name[name(30)]["bytes"] == 8
    assert by_name[scope.name]["in_use"] is True
    text = json.dumps(status)
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text


def test_status_with_absolute_root_shows_only_its_name(tmp_path, clock):
    tm = TempManager(tmp_path / "spool", clock=clock)
    with tm.scope("x") as scope:
        scope.write(b"1")
        text = json.dumps(tm.status())
    assert json.loads(text)["root"] == "spool"
    assert str(tmp_path) not in text


def test_status_caps_entries(root, clock):
    tm = make(root, clock)
    for i in range(MAX_STATUS_ENTRIES + 5):
        leftover(root, name(100 + i), 1, T0 - i)
    status = tm.status()
    assert len(status["entries"]) == MAX_STATUS_ENTRIES and status["entries_truncated"] is True
    assert status["files"] == MAX_STATUS_ENTRIES + 5
    assert status["entries"][0]["age_seconds"] >= status["entries"][-1]["age_seconds"]   # oldest first


def test_empty_status(root, clock):
    status = make(root, clock).status()
    assert status["files"] == 0 and status["entries"] == [] and status["oldest_age_seconds"] is None


# ---------------------------------------------------------------- threads


def test_many_threads_with_scopes_while_sweeping(root, clock):
    tm = make(root, clock, ttl_seconds=0)   # everything unheld is expired at once
    tm.startup_sweep()
    errors: list[BaseException] = []
    start = threading.Barrier(33)

    def request(i: int) -> None:
        try:
            start.wait()
            for round_ in range(5):
                with tm.scope(f"req{i}") as scope:
                    paths = [scope.write(f"{i}-{round_}-{k}".encode(), suffix=".txt") for k in range(4)]
                    clock.now += 0.001
                    for k, p in enumerate(paths):   # a concurrent forced sweep never touches them
                        assert p.read_bytes() == f"{i}-{round_}-{k}".encode()
        except BaseException as exc:   # noqa: BLE001 - reported below
            errors.append(exc)

    def sweeper() -> None:
        start.wait()
        for _ in range(30):
            tm.sweep(force=True)
            tm.status()

    threads = [threading.Thread(target=request, args=(i,)) for i in range(32)]
    threads.append(threading.Thread(target=sweeper))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors[:3]
    assert list(root.iterdir()) == []
    assert tm.status()["active_scopes"] == 0
