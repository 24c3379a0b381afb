"""The shared helpers: a file that appears whole or not at all, and the lock that keeps two writers apart."""

import os
import socket

import pytest

from shakespeare_gpt.utils import UserError, atomic_open, lock


def test_an_atomic_file_appears_only_when_complete_with_the_usual_permissions_or_the_replaced_files(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write("half")
        raise RuntimeError("cut off")
    assert not path.exists() and list(path.parent.iterdir()) == []  # no half file, no side file
    with atomic_open(path) as f:
        f.write("whole")
    assert path.read_text() == "whole"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes it, not mkstemp's 0600
    path.chmod(0o604)  # a mode no usual umask gives
    with atomic_open(path) as f:
        f.write("again")
    assert path.read_text() == "again" and path.stat().st_mode & 0o777 == 0o604  # a file replaced keeps its mode


def test_a_held_lock_refuses_a_second_holder_naming_the_first_and_asking_changes_nothing(tmp_path):
    path = tmp_path / "run" / ".lock"
    assert lock(path, "busy", create=False) is None and not path.exists()  # asking creates nothing
    held = lock(path, "busy")
    with pytest.raises(UserError, match=rf"^busy \(pid {os.getpid()} on {socket.gethostname()} holds "):
        lock(path, "busy")
    held.close()
    before = path.read_bytes()
    lock(path, "busy", create=False).close()  # only asks: the holder's line stays
    assert path.read_bytes() == before
