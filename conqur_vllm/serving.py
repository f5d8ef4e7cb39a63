"""``conqur serve``: vLLM's OpenAI-compatible server for a conqur checkpoint, with the CPU quirks handled.

A thin wrapper: it checks the checkpoint, makes the ``vllm`` distribution findable for the CPU build, picks the
KV-cache dtype the checkpoint asks for (unless ``--kv-cache-dtype`` is given), binds 127.0.0.1 by default and
passes every other flag to vLLM unchanged.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from conqur_vllm.config import ConqurQuantConfig
from conqur_vllm.vllm_compat import ensure_vllm_distribution

CPU_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2"}
# The leader of a new process group that runs the command as its child. Linux sends it SIGTERM when the process
# that started it dies (parent-death signal), and SIGTERM from anywhere stops the whole group: the command and
# the workers it started, after a grace period with SIGKILL. A launcher, not ``preexec_fn`` (unsafe with threads).
_TIED_LAUNCHER = """import ctypes, os, signal, subprocess, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
stopped = False
def stop(*_):
    global stopped
    stopped = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, lambda *_: os.killpg(0, signal.SIGKILL))
    signal.alarm(30)
    os.killpg(0, signal.SIGTERM)
signal.signal(signal.SIGTERM, stop)
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)
child = subprocess.Popen(sys.argv[2:])
if stopped:
    os.killpg(0, signal.SIGTERM)
code = child.wait()
sys.exit(143 if stopped else code)
"""


def start_tied_process(cmd: list[str], env: dict[str, str] | None = None, stdout=None) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, under a launcher that stops the group (``cmd`` and the workers it
    starts) on SIGTERM and also when this process dies without stopping it, e.g. killed by a timeout: a server
    left behind would keep its port and its GPU memory. The returned process is the launcher; it exits with
    ``cmd``'s status."""
    launcher = [sys.executable, "-c", _TIED_LAUNCHER, str(os.getpid())]
    return subprocess.Popen(launcher + list(cmd), env=env, stdout=stdout,
                            stderr=subprocess.STDOUT if stdout is not None else None, start_new_session=True)


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def server_command(checkpoint: str | Path, host: str, port: int, vllm_args: list[str],
                   plain_model: bool = False) -> list[str]:
    """The vLLM API-server command line for ``checkpoint`` (``plain_model``: an unquantized HF folder)."""
    ckpt = Path(checkpoint)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt),
           "--host", host, "--port", str(port)]
    if not plain_model:
        qcfg = ConqurQuantConfig.from_model_dir(ckpt)  # one-line error if this is not a conqur checkpoint
    if not plain_model and not _has_flag(vllm_args, "--kv-cache-dtype"):
        from conqur_vllm.vllm_plugin.kv_dtype import default_kv_cache_dtype

        cmd += ["--kv-cache-dtype", default_kv_cache_dtype(qcfg)]
    return cmd + list(vllm_args)


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    for key, value in CPU_DEFAULTS.items():
        env.setdefault(key, value)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000,
          vllm_args: list[str] | None = None) -> None:
    """Run the server in the foreground (replaces this process)."""
    ensure_vllm_distribution()
    cmd = server_command(checkpoint, host, port, list(vllm_args or []))
    print(f"conqur serve: {' '.join(cmd)}", file=sys.stderr, flush=True)
    os.execve(sys.executable, cmd, server_env())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A vLLM server subprocess on loopback (context manager), for the demo, tests and benchmarks."""

    def __init__(self, checkpoint: str | Path, vllm_args: list[str] | None = None, timeout: float = 600,
                 log_path: str | Path | None = None, plain_model: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ensure_vllm_distribution()
        args = list(vllm_args or ["--enforce-eager", "--max-model-len", "2048"])
        self.cmd = server_command(checkpoint, "127.0.0.1", self.port, args, plain_model=plain_model)
        self.timeout = timeout
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = start_tied_process(self.cmd, env=server_env(), stdout=log)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with code {self.proc.returncode}"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        self.__exit__(None, None, None)
        raise TimeoutError(f"vLLM server did not become healthy within {self.timeout:.0f}s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()

    def post(self, path: str, payload: dict, timeout: float = 300) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read().decode()


def chat_once(checkpoint: str | Path, question: str, max_tokens: int = 48) -> str:
    """Start a server, ask one chat question (greedy), stop the server, return the answer."""
    with RunningServer(checkpoint) as server:
        model = server.post("/v1/chat/completions", {"model": str(checkpoint), "max_tokens": max_tokens,
                                                      "temperature": 0.0,
                                                      "messages": [{"role": "user", "content": question}]})
        return model["choices"][0]["message"]["content"].strip()
