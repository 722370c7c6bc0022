"""Scratch folders and stop signals: a stopped command removes its scratch; one a SIGKILL left is removed by
the next run, and only once its owner is gone (a reused PID does not keep it alive)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pneumonia_kfp import scratch
from pneumonia_kfp.errors import PneumoniaKfpError
from pneumonia_kfp.procs import (
    Stopped,
    alive,
    descendants,
    start_time,
    stop_signals_raise,
    stoppable,
    usable_cores,
)
from pneumonia_kfp.synthetic import make_synthetic


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    """TMPDIR of this test (and of the processes it starts): its scratch root is its own."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() reads TMPDIR again
    return tmp


def _folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir()) if root.exists() else []


def _fake_scratch(root: Path, name: str, owner: dict | None) -> Path:
    folder = root / name
    (folder / scratch.WORK).mkdir(parents=True)
    if owner is not None:
        (folder / scratch.OWNER).write_text(json.dumps(owner))
    return folder


def test_start_time_names_one_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = start_time(child.pid)
        assert started is not None and started >= start_time(os.getpid())  # started after this process
        assert start_time(child.pid) == started  # stable while it runs
    finally:
        child.kill()
        child.wait()
    assert start_time(child.pid) is None


def test_a_zombie_has_no_start_time_and_a_name_with_parentheses_is_read_right(tmp_path):
    odd = tmp_path / "a) Z 1 (b"  # the command name, in parentheses in /proc/<pid>/stat, with ") Z" in it
    odd.symlink_to(sys.executable)
    child = subprocess.Popen([str(odd), "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while "a) Z 1 (b" not in Path(f"/proc/{child.pid}/stat").read_text() and time.monotonic() < deadline:
            time.sleep(0.02)  # until the exec has happened
        assert alive(child.pid) and start_time(child.pid) is not None
        assert start_time(child.pid) >= start_time(os.getpid())
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # a zombie (killed, not yet reaped): not running, no start time
        assert not alive(child.pid) and start_time(child.pid) is None
    finally:
        child.kill()
        child.wait()


def test_scratch_dir_is_under_the_project_folder_with_its_owner_and_goes_on_exit(tmpdir_env):
    root = scratch.scratch_root()
    assert root == tmpdir_env / f"pneumonia-kfp-{os.geteuid()}"
    with scratch.scratch_dir("ingest-") as tmp:
        work = Path(tmp)
        assert work.is_dir() and not list(work.iterdir()) and work.parent.parent == root
        assert work.parent.name.startswith(f"{os.getpid()}-ingest-")
        owner = json.loads((work.parent / scratch.OWNER).read_text())
        assert owner["pid"] == os.getpid() and owner["start"] == start_time(os.getpid())
        assert scratch.sweep() == [] and work.is_dir()  # its owner runs: kept
    assert _folders(root) == []
    with pytest.raises(RuntimeError), scratch.scratch_dir() as tmp:  # an error on the way: removed all the same
        raise RuntimeError("boom")
    assert _folders(root) == []


def test_sweep_removes_only_folders_whose_owner_is_gone(tmpdir_env):
    root = scratch.scratch_root()
    root.mkdir()
    me = scratch.owner_of(os.getpid())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _fake_scratch(root, "live", me)
    _fake_scratch(root, "gone", {**me, "pid": dead.pid})
    _fake_scratch(root, "reused", {**me, "start": me["start"] - 1})  # this PID, but an earlier process
    _fake_scratch(root, "rebooted", {**me, "boot": "another-boot"})
    _fake_scratch(root, "elsewhere", {**me, "pid": dead.pid, "pidns": "pid:[1]"})  # another PID namespace's
    _fake_scratch(root, "being-made", None)
    abandoned = _fake_scratch(root, "abandoned", None)
    old = time.time() - scratch.UNOWNED_GRACE_S - 10
    os.utime(abandoned, (old, old))
    torn = _fake_scratch(root, "torn", None)
    (torn / scratch.OWNER).write_text('{"pid": ')  # not a whole owner.json: no scratch_dir() writes that
    strays = [root / f"stray-{i}" for i in range(8)]  # not folders: not scratch_dir()'s, never touched
    for stray in strays:
        stray.write_text("")
    removed = scratch.sweep()
    assert sorted(p.name for p in removed) == ["abandoned", "gone", "rebooted", "reused", "torn"]
    assert [p.name for p in _folders(root)] == ["being-made", "elsewhere", "live"] + [s.name for s in strays]


def test_sweep_of_no_root_and_a_root_that_is_not_ours(tmpdir_env):
    assert scratch.sweep() == []  # nothing made yet
    scratch.scratch_root().write_text("")  # a file where the folder goes
    with pytest.raises(PneumoniaKfpError) as e, scratch.scratch_dir():
        pass
    assert str(e.value) == (f"{scratch.scratch_root()} is not a directory of this user's (uid {os.geteuid()}); "
                            "remove it, or set TMPDIR to another directory for the temporary files")
    scratch.scratch_root().unlink()
    (tmpdir_env / "elsewhere").mkdir()
    scratch.scratch_root().symlink_to(tmpdir_env / "elsewhere")  # a link another user could have planted
    with pytest.raises(PneumoniaKfpError, match="is not a directory of this user's"), scratch.scratch_dir():
        pass
    assert list((tmpdir_env / "elsewhere").iterdir()) == []


def test_a_stop_signal_runs_the_cleanup_and_exits_128_plus_the_signal(tmpdir_env, capsys):
    seen = {}

    @stoppable
    def command(args):
        with scratch.scratch_dir("x-") as tmp:
            seen["tmp"] = Path(tmp)
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(10)  # the handler raises before this ends
        return 0

    start = time.monotonic()
    handler = signal.getsignal(signal.SIGHUP)
    assert command(type("Args", (), {"command": "evaluate"})()) == 128 + signal.SIGHUP
    assert time.monotonic() - start < 5
    assert not seen["tmp"].parent.exists() and _folders(scratch.scratch_root()) == []
    assert capsys.readouterr().err == ("pneumonia-kfp evaluate: stopped by SIGHUP; its temporary files were "
                                       "removed\n")
    assert signal.getsignal(signal.SIGHUP) is handler  # restored


def test_a_second_signal_does_not_cut_the_cleanup_short():
    cleaned = []
    with pytest.raises(Stopped) as stopped, stop_signals_raise():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # ignored: the cleanup goes on
            cleaned.append(True)
    assert stopped.value.signum == signal.SIGTERM and cleaned == [True]


def test_a_command_called_outside_the_main_thread_runs_without_handlers():
    import threading

    result, handler = [], signal.getsignal(signal.SIGTERM)

    @stoppable
    def command(args):
        result.append(signal.getsignal(signal.SIGTERM))
        return 7

    thread = threading.Thread(target=lambda: result.append(command(None)))
    thread.start()
    thread.join()
    assert result == [handler, 7]  # no ValueError: signal handlers are the main thread's


# --- a real standalone ingest, stopped halfway ---------------------------------------------------------------

@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """Enough images at 256 px that ingest reads for a few seconds on 2 cores."""
    return make_synthetic(tmp_path_factory.mktemp("big"), {"train": 400, "test": 100}, size=256)


def _start_ingest(data: Path, store: Path, tmpdir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pneumonia_kfp.pipelines.cli", "ingest", "--data", str(data),
                             "--storage", str(store), "--image-size", "256"],
                            env={**os.environ, "TMPDIR": str(tmpdir)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_until_reading(proc: subprocess.Popen, root: Path) -> Path:
    """The scratch folder of ``proc``, once every reader (worker process) has started writing there.

    Not earlier: a stop while a worker is being spawned leaves that worker, not yet started, to print an
    EOFError from multiprocessing's start-up (a race in ingest's pool start, not in the scratch handling)."""
    readers = min(usable_cores(), 2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        packs = list(root.glob(f"{proc.pid}-ingest-*/work/packs/*.pack"))
        if len(packs) >= readers:
            return packs[0].parents[2]
        time.sleep(0.02)
    raise AssertionError(f"ingest never started reading (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stopped_ingest_removes_its_scratch(big_folder, tmp_path, sig):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    root = tmpdir / f"pneumonia-kfp-{os.geteuid()}"
    proc = _start_ingest(big_folder, tmp_path / "store", tmpdir)
    folder = _wait_until_reading(proc, root)
    workers = descendants(proc.pid)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == (f"pneumonia-kfp ingest: stopped by {signal.Signals(sig).name}; "
                                            "its temporary files were removed")
    assert "Traceback" not in err
    assert not folder.exists() and _folders(root) == []
    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if alive(p)], "ingest's workers outlived it"


def test_scratch_of_a_killed_ingest_is_removed_by_the_next_run(big_folder, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    root = tmpdir / f"pneumonia-kfp-{os.geteuid()}"
    proc = _start_ingest(big_folder, tmp_path / "store", tmpdir)
    folder = _wait_until_reading(proc, root)
    proc.kill()
    proc.communicate(timeout=60)
    assert (folder / "work" / "rows.u8").exists()  # SIGKILL runs no cleanup: left behind
    again = _start_ingest(big_folder, tmp_path / "store", tmpdir)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert out.strip().startswith((tmp_path / "store").as_uri() + "/datasets/")
    assert not folder.exists() and _folders(root) == []  # the killed one's by the sweep, its own on exit
