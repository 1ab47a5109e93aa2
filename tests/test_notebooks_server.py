"""Every notebook runs cell by cell through a Jupyter server's kernel, as in ``make lab``.

The server is ``scripts/lab.sh`` (what ``make lab`` starts) on loopback with a random token and a
free port; each notebook gets a kernel from the server's REST API, its code cells are sent one
by one over the kernel's websocket (the parameters cell, then an injected cell of overrides, as
papermill does, then the rest), and every cell must reply ``ok``. Each cell and the server
start are bounded in time; the server is stopped afterwards (its kernels with it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPOSITORY / "notebooks"
SERVER_START_S = 120
CELL_TIMEOUT_S = 600



def _require_jupyterlab() -> None:
    """JupyterLab comes with the notebooks extra, which `make test` installs: missing, these tests
    skip, except under CI, where they fail. Checked when a test needs the server, not on import, so
    collecting this module in an environment without it (the serving venv) is harmless."""
    if importlib.util.find_spec("jupyterlab") is None:
        if os.environ.get("CI"):
            pytest.fail("JupyterLab is missing: pip install 'econoserve[notebooks]' (make test does)")
        pytest.skip("JupyterLab is not installed (pip install 'econoserve[notebooks]')")


def _parameters(tmp: Path) -> dict[str, dict]:
    """Small parameters per notebook (the same scale as the papermill tests)."""
    return {
        "01_trace_analysis.ipynb": {"datasets": ["alpaca", "qmsum"], "tokenizer": "gpt2", "sample_size": 200,
                                    "seed": 1, "output_dir": str(tmp / "figures")},
        "02_rl_predictor.ipynb": {"dataset": "alpaca-vicuna", "max_train": 1000, "seed": 2,
                                  "output_dir": str(tmp / "figures"), "model_dir": str(tmp / "models")},
        "03_simulated_serving.ipynb": {"datasets": ["qmsum"], "schedulers": ["vllm", "econoserve"],
                                       "ablations": ["econoserve", "econoserve-no-kvcpipe"], "predictor": "oracle",
                                       "num_requests": 60,
                                       "sensitivity": False, "output_dir": str(tmp / "results"),
                                       "figures_dir": str(tmp / "figures")},
        "04_vllm_serving.ipynb": {"num_requests": 24, "rate": 20.0, "predictor": "oracle", "profile": "quick", "repeats": 1,
                                  "output_dir": str(tmp / "results"), "figures_dir": str(tmp / "figures")},
        "05_gpus_needed.ipynb": {"datasets": ["sharegpt"], "models": ["opt-13b"], "slo_kinds": ["jct"],
                                 "predictor": "oracle", "target_multiples": [1.0, 2.0], "distserve_check": False,
                                 "output_dir": str(tmp / "results"), "figures_dir": str(tmp / "figures")},
    }


class Server:
    """A running ``scripts/lab.sh``: its base URL and token."""

    def __init__(self, process: subprocess.Popen, url: str, token: str) -> None:
        self.process, self.url, self.token = process, url, token

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Authorization": f"token {self.token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read()
        return json.loads(text) if text else {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _require_jupyterlab()
    port, token = _free_port(), secrets.token_hex(16)
    log = tmp_path_factory.mktemp("lab") / "server.log"
    env = {**os.environ, "PYTHON": sys.executable, "JUPYTER_RUNTIME_DIR": str(log.parent / "runtime"),
           "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    with log.open("w") as out:
        process = subprocess.Popen(
            ["bash", str(REPOSITORY / "scripts" / "lab.sh"), f"--ServerApp.port={port}",
             f"--ServerApp.token={token}", "--ServerApp.port_retries=0"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    running = Server(process, f"http://127.0.0.1:{port}", token)
    try:
        _wait_until_up(running, log)
        yield running
    finally:
        _stop(process)


def _wait_until_up(server: Server, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the Jupyter server exited ({server.process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            server.request("GET", "/api/status")
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the Jupyter server did not answer within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # the server shuts its kernels down
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _cells_with_overrides(path: Path, overrides: dict) -> list[str]:
    """The notebook's code cells, with a cell of ``overrides`` after the ``parameters`` cell."""
    cells = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        cells.append(cell.source)
        if "parameters" in cell.metadata.get("tags", []):
            cells.append("\n".join(f"{name} = {value!r}" for name, value in overrides.items()))
    return cells


async def _run_cells(server: Server, kernel_id: str, cells: list[str]) -> None:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    url = f"{server.url.replace('http', 'ws')}/api/kernels/{kernel_id}/channels"
    connection = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {server.token}"}))
    session = uuid.uuid4().hex
    try:
        for number, code in enumerate(cells):
            msg_id = uuid.uuid4().hex
            await connection.write_message(json.dumps({
                "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": session,
                           "username": "test", "version": "5.3"},
                "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                            "allow_stdin": False, "stop_on_error": True},
            }))
            reply = await asyncio.wait_for(_reply_to(connection, msg_id), CELL_TIMEOUT_S)
            if reply["status"] != "ok":
                traceback = "\n".join(reply.get("traceback", []))
                pytest.fail(f"cell {number} failed: {reply.get('ename')}: {reply.get('evalue')}\n{traceback}\n{code}")
    finally:
        connection.close()


async def _reply_to(connection, msg_id: str) -> dict:
    while True:
        text = await connection.read_message()
        if text is None:
            raise ConnectionError("the kernel's websocket closed")
        message = json.loads(text)
        if message.get("parent_header", {}).get("msg_id") == msg_id and message["msg_type"] == "execute_reply":
            return message["content"]


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("[0-9]*.ipynb")))
def test_notebook_runs_cell_by_cell_in_a_server_kernel(server, name, tmp_path):
    if name.startswith("04"):
        from econoserve.serving.study import serving_python_available

        if not serving_python_available():
            if os.environ.get("CI") or os.environ.get("ECONOSERVE_REQUIRE_VLLM") == "1":
                pytest.fail("notebook 04 needs .venv-serving (scripts/install_serving.sh)")
            pytest.skip("no .venv-serving with vLLM (scripts/install_serving.sh)")
    overrides = _parameters(tmp_path)[name]
    kernel = server.request("POST", "/api/kernels", {"name": "python3", "path": ""})
    try:
        # the kernel runs where `make lab` runs it: the repository root
        asyncio.run(_run_cells(server, kernel["id"], ["import os; assert os.getcwd() == %r, os.getcwd()"
                                                      % str(REPOSITORY)]))
        asyncio.run(_run_cells(server, kernel["id"], _cells_with_overrides(NOTEBOOKS / name, overrides)))
    finally:
        server.request("DELETE", f"/api/kernels/{kernel['id']}")
    written = list((tmp_path / "figures").glob("*.png"))
    assert written, f"{name} drew no figure"


def test_a_failing_cell_is_reported_with_its_error(server):
    kernel = server.request("POST", "/api/kernels", {"name": "python3", "path": ""})
    try:
        with pytest.raises(pytest.fail.Exception, match="cell 1 failed: ZeroDivisionError"):
            asyncio.run(_run_cells(server, kernel["id"], ["x = 1", "x / 0", "never = 'run'"]))
    finally:
        server.request("DELETE", f"/api/kernels/{kernel['id']}")
