"""A server started for a benchmark or test must not outlive the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conqur_vllm.serving import start_tied_process

PARENT = """
import subprocess, sys, time
from conqur_vllm.serving import start_tied_process
child = [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(300)"]
launcher = start_tied_process(child, stdout=subprocess.PIPE)
print(launcher.pid, launcher.stdout.readline().decode().strip(), flush=True)
time.sleep(300)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()  # a zombie has ended (nothing may reap it here)
    except FileNotFoundError:
        return False


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not any(_running(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_command_and_launcher_end_when_the_starting_process_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    launcher, command = (int(v) for v in parent.stdout.readline().split())
    try:
        assert _running(launcher) and _running(command)
        assert os.getpgid(command) == launcher  # one process group: the launcher leads it
        parent.kill()  # SIGKILL: no cleanup code of the parent runs
        parent.wait()
        assert _gone_within([launcher, command], 20)
    finally:
        for pid in (launcher, command):
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_to_the_launcher_stops_the_command_and_passes_its_status():
    launcher = start_tied_process([sys.executable, "-c", "import time; time.sleep(300)"])
    time.sleep(1.0)
    os.killpg(launcher.pid, signal.SIGTERM)
    assert launcher.wait(timeout=20) == 143
    done = start_tied_process([sys.executable, "-c", "import sys; sys.exit(7)"])
    assert done.wait(timeout=20) == 7
