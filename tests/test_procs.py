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
