"""The process table the run-local supervisor and the process tests read: descendants and liveness."""
import os
import signal
import subprocess
import sys
import time

from pneumonia_kfp.procs import alive, descendants, process_table


def _until(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_descendants_and_liveness_of_a_real_process_tree():
    # a child that starts a grandchild and waits for it; the grandchild sleeps until killed
    code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert _until(lambda: descendants(child.pid)), "no grandchild appeared"
        (grandchild,) = descendants(child.pid)
        assert descendants(os.getpid()) >= {child.pid, grandchild}
        assert process_table()[grandchild][1] == str(child.pid)  # its parent
        assert alive(child.pid) and alive(grandchild)
        os.kill(grandchild, signal.SIGKILL)
        assert _until(lambda: not alive(grandchild))  # a zombie until its parent reaps it: not alive
        assert _until(lambda: child.poll() is not None)
    finally:
        child.kill()
        child.wait()
    assert not alive(child.pid) and not descendants(child.pid)


# --- a process group that ends whole (pneumonia_kfp.supervise) ------------------------------------------------

# a leader: starts a member that sleeps, writes "<member pid>" to argv[2] once its stop handler is set, sleeps
LEADER = """
import os, subprocess, sys, time
from pathlib import Path
from pneumonia_kfp.supervise import end_group, lead_group

def stop(signum):
    end_group(grace_s=5)
    Path(sys.argv[2] + ".ended").write_text("")
    os._exit(128 + signum)

member = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
lead_group(int(sys.argv[1]), stop)
Path(sys.argv[2]).write_text(str(member.pid))
time.sleep(60)
"""


def test_a_stop_signal_ends_the_whole_group_through_its_leader_then_the_cleanup_runs(tmp_path):
    from pneumonia_kfp.supervise import run_group

    ready, leaders, cleaned = tmp_path / "ready", [], []

    def started(pid):
        leaders.append(pid)
        assert _until(ready.exists, 30), "the leader never got ready"
        os.kill(os.getpid(), signal.SIGTERM)  # as a user's kill of run-local would

    before = signal.getsignal(signal.SIGTERM)
    code, stopped = run_group([sys.executable, "-c", LEADER, str(os.getpid()), str(ready)], started=started,
                              after=lambda: cleaned.append(signal.getsignal(signal.SIGTERM)))
    assert (code, stopped) == (128 + signal.SIGTERM, signal.SIGTERM)
    assert (tmp_path / "ready.ended").exists()  # the leader's own stop ran: it ended its member itself
    member = int(ready.read_text())
    assert _until(lambda: not alive(member)) and not alive(leaders[0])
    assert cleaned and cleaned[0] is not before  # the cleanup ran with the stop handler still in place
    assert signal.getsignal(signal.SIGTERM) is before  # and only then was the caller's restored


def test_whatever_outlives_the_leader_is_killed(tmp_path):
    from pneumonia_kfp.supervise import run_group

    pid_file = tmp_path / "member"
    code = ("import subprocess, sys; from pathlib import Path\n"
            "m = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"Path({str(pid_file)!r}).write_text(str(m.pid)); sys.exit(3)\n")
    assert run_group([sys.executable, "-c", code]) == (3, None)
    member = int(pid_file.read_text())
    assert _until(lambda: not alive(member)), "a member of the group outlived its leader"
