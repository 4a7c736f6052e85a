"""Who may take a decision spool file: its owner while the owner's lock is held, anyone once it is not. Process ids
in the file names decide nothing (a pid may be reused, and in containers every scorer may be pid 1)."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from service.api.spool import DecisionSpool

_ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.Popen[str]:
    """A Python process running ``code`` on this checkout; it reads the test's lines on stdin, writes its own."""
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=_ROOT,
        env={**os.environ, "PYTHONPATH": str(_ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()


def _line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, f"the child process ended early (exit status {child.wait()})"
    return line.strip()


def _ids(spool: DecisionSpool, paths: list[Path]) -> list[str]:
    return sorted(row["decision_id"] for path in paths for batch in spool.read(path, 100) for row in batch)


def _owners(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("owner-*.lock"))


def test_a_file_named_after_a_live_process_is_claimed_when_its_owner_lock_is_free(tmp_path: Path) -> None:
    # pid 1 and the test runner's parent are alive; the writers of these files (whose lock files nobody holds) are
    # not: the pids were reused.
    stale = os.getppid()
    (tmp_path / "owner-1-reused.lock").write_bytes(b"")
    (tmp_path / "pending-1-reused.jsonl").write_bytes(b'{"decision_id": "dec_1"}\n')
    (tmp_path / f"owner-{stale}-reused.lock").write_bytes(b"")
    (tmp_path / f"replaying-{stale}-reused-0.jsonl").write_bytes(b'{"decision_id": "dec_2"}\n')
    spool = DecisionSpool(tmp_path, ())
    claimed = spool.claim()
    assert _ids(spool, claimed) == ["dec_1", "dec_2"]
    assert _owners(tmp_path) == [spool.owner_lock_path.name]  # the stale lock files went with their files
    spool.close()


def test_a_file_whose_owner_lives_in_another_process_is_left_alone_whatever_pid_its_name_shows(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    # The owner holds its lock under a token naming a pid that does not exist.
    owner = _python(
        f"""
import fcntl, os, sys
from pathlib import Path
directory = Path({str(tmp_path)!r})
fd = os.open(directory / "owner-999999999-live.lock", os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
(directory / "pending-999999999-live.jsonl").write_bytes(b'{{"decision_id": "dec_pending"}}\\n')
(directory / "replaying-999999999-live-0.jsonl").write_bytes(b'{{"decision_id": "dec_replaying"}}\\n')
print("ready", flush=True)
sys.stdin.read()
"""
    )
    children.append(owner)
    assert _line(owner) == "ready"
    spool = DecisionSpool(tmp_path, ())
    assert spool.claim() == []
    assert "owner-999999999-live.lock" in _owners(tmp_path)  # asking did not take it away

    assert owner.stdin is not None
    owner.stdin.close()  # the owner exits
    assert owner.wait(timeout=30) == 0
    assert _ids(spool, spool.claim()) == ["dec_pending", "dec_replaying"]
    assert _owners(tmp_path) == [spool.owner_lock_path.name]
    spool.close()


_SPOOLING_OWNER = """
import sys
from service.api.spool import DecisionSpool
spool = DecisionSpool({directory!r}, ())
spool.check_writable()
spool.append([{{"decision_id": "dec_killed"}}])
print(spool.pending_path, spool.owner_lock_path, flush=True)
sys.stdin.read()
"""


def test_the_files_of_an_owner_killed_by_sigkill_are_claimable(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    owner = _python(_SPOOLING_OWNER.format(directory=str(tmp_path)))
    children.append(owner)
    pending, lock = map(Path, _line(owner).split())
    assert pending.exists()
    assert lock.exists()
    spool = DecisionSpool(tmp_path, ())
    assert spool.claim() == []

    owner.send_signal(signal.SIGKILL)  # no clean-up of its own: the kernel drops its lock
    assert owner.wait(timeout=30) == -signal.SIGKILL
    assert _ids(spool, spool.claim()) == ["dec_killed"]
    assert not lock.exists()
    spool.close()


def test_a_forked_child_takes_neither_its_parent_s_files_nor_its_lock_with_it(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    # The parent spools, then forks: the child shares the parent's open lock file, and must neither take the
    # parent's files as its own nor keep them locked once the parent is gone.
    parent = _python(
        f"""
import os, sys
from service.api.spool import DecisionSpool
spool = DecisionSpool({str(tmp_path)!r}, ())
spool.append([{{"decision_id": "dec_parent"}}])
if os.fork() == 0:
    claimed = spool.claim()
    os.write(1, f"child {{os.getpid()}} {{len(claimed)}} {{spool.owner_lock_path.name}}\\n".encode())
    os.read(0, 1)
    os._exit(0)
os.write(1, f"parent {{spool.owner_lock_path.name}}\\n".encode())
os.read(0, 1)
"""
    )
    children.append(parent)
    said = dict(line.split(" ", 1) for line in (_line(parent), _line(parent)))
    child_pid, child_claimed, child_lock = said["child"].split()
    assert child_claimed == "0"  # the parent's file stayed the parent's
    assert child_lock != said["parent"]
    try:
        assert DecisionSpool(tmp_path, ()).claim() == []  # the parent is alive

        parent.send_signal(signal.SIGKILL)  # its child lives on, holding a copy of the parent's lock descriptor
        parent.wait(timeout=30)
        spool = DecisionSpool(tmp_path, ())
        assert _ids(spool, spool.claim()) == ["dec_parent"]
        assert said["parent"] not in _owners(tmp_path)
        spool.close()
    finally:
        os.kill(int(child_pid), signal.SIGKILL)  # not the test's child: it cannot be waited for here


def test_a_fork_waits_until_no_spool_is_half_way_through_taking_or_probing_a_lock(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    # A fork while another thread held a spool's lock (between opening a lock descriptor and recording it, or
    # probing others' locks) left the child a descriptor, and a dead parent's files unclaimable while it lived.
    parent = _python(
        f"""
import os, threading, time
from service.api.spool import DecisionSpool
spool = DecisionSpool({str(tmp_path)!r}, ())
spool.check_writable()
spool._lock.acquire()  # as a thread inside _own() or claim() holds it
released = []

def release_later():
    time.sleep(0.3)
    released.append(True)
    spool._lock.release()

threading.Thread(target=release_later).start()
pid = os.fork()
if pid == 0:
    os.write(1, f"released before the fork: {{bool(released)}}\\n".encode())
    os._exit(0)
os.waitpid(pid, 0)
"""
    )
    children.append(parent)
    assert _line(parent) == "released before the fork: True"
    assert parent.wait(timeout=30) == 0


_CLAIMER = """
import json, sys
from service.api.spool import DecisionSpool
spool = DecisionSpool({directory!r}, ())
spool.check_writable()
sys.stdin.readline()
claimed = spool.claim()
print(json.dumps([row["decision_id"] for path in claimed for batch in spool.read(path, 100) for row in batch]),
      flush=True)
sys.stdin.read()  # alive, its claimed files its own, until the test has both answers
"""


def test_two_processes_claiming_at_once_take_each_file_once(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    expected = []
    for owner in range(40):
        token = f"{owner}-gone"
        (tmp_path / f"owner-{token}.lock").write_bytes(b"")  # its owner died and left it
        for kind, name in (("pending", f"pending-{token}"), ("replaying", f"replaying-{token}-0")):
            decision_id = f"dec_{owner}_{kind}"
            (tmp_path / f"{name}.jsonl").write_bytes(orjson.dumps({"decision_id": decision_id}) + b"\n")
            expected.append(decision_id)
    claimers = [_python(_CLAIMER.format(directory=str(tmp_path))) for _ in range(2)]
    children.extend(claimers)
    for claimer in claimers:
        assert claimer.stdin is not None
        claimer.stdin.write("go\n")
        claimer.stdin.flush()
    first, second = (orjson.loads(_line(claimer)) for claimer in claimers)
    assert sorted([*first, *second]) == sorted(expected)
    assert len(_owners(tmp_path)) == 2  # the dead owners' lock files are gone; the two claimers' stay while they live


def test_the_owner_lock_is_flock_not_a_record_lock(tmp_path: Path) -> None:
    # flock belongs to the open file description: another descriptor in this process is refused it, and closing
    # that descriptor leaves the owner's lock in place (a record lock would be granted, and lost on that close).
    spool = DecisionSpool(tmp_path, ())
    spool.check_writable()
    probe = os.open(spool.owner_lock_path, os.O_RDONLY)
    with pytest.raises(BlockingIOError):
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(probe)
    assert DecisionSpool(tmp_path, ()).claim() == []
    spool.append([{"decision_id": "dec_1"}])
    other = DecisionSpool(tmp_path, ())
    assert other.claim() == []
    spool.close()
    assert _ids(other, other.claim()) == ["dec_1"]
    other.close()


def test_a_spool_whose_directory_was_deleted_keeps_writing_and_keeps_its_files_its_own(tmp_path: Path) -> None:
    # Its lock on the removed lock file guarded nothing: appends failed (the directory was made only with the first
    # lock), and once another scorer made the directory again, this spool's new file lay beside no lock file and
    # was claimed from under it while it still appended to it.
    directory = tmp_path / "spool"
    spool = DecisionSpool(directory, ())
    spool.append([{"decision_id": "dec_1"}])
    shutil.rmtree(directory)
    spool.append([{"decision_id": "dec_2"}])
    assert spool.owner_lock_path.exists()
    other = DecisionSpool(directory, ())
    assert other.claim() == []
    assert _ids(spool, spool.claim()) == ["dec_2"]
    spool.close()
    other.close()
