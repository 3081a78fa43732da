"""`make lab` opens JupyterLab: start it headless on a free loopback port, run code in a kernel through its REST and
websocket API, check the answer, and shut everything down."""
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def execute(ws_url: str, code: str, timeout: float = 60.0) -> str:
    from tornado.websocket import websocket_connect

    conn = await websocket_connect(ws_url)
    msg_id = uuid.uuid4().hex
    conn.write_message(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex, "msg_type": "execute_request",
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }))
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = await asyncio.wait_for(conn.read_message(), timeout=deadline - time.monotonic())
        assert raw is not None, "the kernel's websocket closed"
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = msg["header"]["msg_type"]
        if kind == "stream":
            out.append(msg["content"]["text"])
        elif kind == "execute_result":
            out.append(msg["content"]["data"]["text/plain"])
        elif kind == "error":
            raise AssertionError(f"kernel error: {msg['content']['ename']}: {msg['content']['evalue']}")
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            break
    conn.close()
    return "".join(out)


@pytest.fixture
def lab(tmp_path):
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_PLATFORM_DIRS": "1"}
    env.pop("JPY_SESSION_NAME", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={REPO / 'notebooks'}",
         "--allow-root"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"token {token}"}
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited early: {proc.stderr.read()[-2000:]}")
            try:
                if requests.get(f"{base}/api/status", headers=headers, timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.25)
        else:
            pytest.fail("jupyter lab did not answer within 60 s")
        yield base, port, token, headers
    finally:
        try:
            requests.post(f"{base}/api/shutdown", headers=headers, timeout=5)
            proc.wait(timeout=20)
        except Exception:
            proc.kill()
            proc.wait(timeout=10)


def test_lab_runs_code_in_a_kernel(lab):
    base, port, token, headers = lab
    # the lab UI itself is served
    assert requests.get(f"{base}/lab", headers=headers, timeout=10).status_code == 200
    # the notebooks folder is what the server shows
    names = {c["name"] for c in requests.get(f"{base}/api/contents", headers=headers, timeout=10).json()["content"]}
    assert "00_setup_check.ipynb" in names
    kernel = requests.post(f"{base}/api/kernels", headers=headers, json={"name": "python3"}, timeout=30).json()
    try:
        ws = f"ws://127.0.0.1:{port}/api/kernels/{kernel['id']}/channels?token={token}"
        code = "import helpers.core.devices as g\nprint(6 * 7)\nprint(g.course_path()[0])"
        out = asyncio.run(execute(ws, code))
        lines = out.split()
        assert lines[0] == "42" and lines[1] in ("cpu", "gpu")
    finally:
        assert requests.delete(f"{base}/api/kernels/{kernel['id']}", headers=headers, timeout=30).status_code == 204
    assert requests.get(f"{base}/api/kernels", headers=headers, timeout=10).json() == []
