"""setup_wandb.py as a user runs it, without network: a private HOME and W&B folders per test."""

import os
import pty
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "setup_wandb.py"
FAKE_KEY = "pepembtestkey" + "0123456789" * 4  # well-formed (40+ characters), never valid


@pytest.fixture
def wandb_env(tmp_path):
    """An environment whose W&B settings, credentials and runs all live under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    for name in ("home", "config", "runs"):
        (tmp_path / name).mkdir()
    env.update(HOME=str(tmp_path / "home"), WANDB_CONFIG_DIR=str(tmp_path / "config"), WANDB_DIR=str(tmp_path / "runs"))
    return env


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens once the socket is closed


def run(env, *args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=env["WANDB_DIR"],
    )


def test_unreachable_server_is_one_line_and_never_shows_the_key(wandb_env):
    wandb_env.update(WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=closed_port_url())
    start = time.monotonic()
    result = run(wandb_env, "--test")
    assert time.monotonic() - start < 30  # wandb's own login would retry for longer
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot reach the W&B server")
    assert "Traceback" not in result.stderr
    assert FAKE_KEY not in result.stdout + result.stderr
    assert not (Path(wandb_env["HOME"]) / ".netrc").exists()  # an unverified key is not stored


def test_missing_key_without_a_terminal(wandb_env):
    result = run(wandb_env)
    assert result.returncode == 2
    assert "error: no W&B API key" in result.stderr and "WANDB_API_KEY" in result.stderr


def test_offline_environment_refuses_to_log_in(wandb_env):
    wandb_env.update(WANDB_MODE="offline", WANDB_API_KEY=FAKE_KEY)
    result = run(wandb_env)
    assert result.returncode == 2 and "unset WANDB_MODE" in result.stderr


def test_offline_test_run_is_written_locally(wandb_env):
    result = run(wandb_env, "--offline", "--test")
    assert result.returncode == 0, result.stderr
    settings = (Path(wandb_env["WANDB_CONFIG_DIR"]) / "settings").read_text()
    assert "mode = offline" in settings
    [run_dir] = (Path(wandb_env["WANDB_DIR"]) / "wandb").glob("offline-run-*")
    [history] = run_dir.glob("run-*.wandb")
    assert history.stat().st_size > 0
    assert f"test run: {run_dir}" in result.stdout and "wandb sync" in result.stdout


def test_typed_key_is_hidden(wandb_env):
    """In a terminal the key is read with echo off: it must not come back on the screen."""
    wandb_env["WANDB_BASE_URL"] = closed_port_url()
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT)],
        env=wandb_env,
        cwd=wandb_env["WANDB_DIR"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        start_new_session=True,
    )
    os.close(terminal)
    screen = read_until(controller, b"W&B API key:")
    os.write(controller, FAKE_KEY.encode() + b"\n")
    screen += read_until(controller, None)
    os.close(controller)
    assert process.wait(timeout=30) == 2
    text = screen.decode(errors="replace")
    assert "/authorize" in text and "cannot reach the W&B server" in text
    assert FAKE_KEY not in text


def read_until(fd, marker: bytes | None, timeout: float = 30.0) -> bytes:
    """Terminal output up to `marker`, or up to the end of the output when marker is None."""
    output, deadline = b"", time.monotonic() + timeout
    while marker is None or marker not in output:
        if not select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
            raise TimeoutError(f"no {marker!r} in {output!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the process closed the terminal
            chunk = b""
        if not chunk:
            if marker is None:
                return output
            raise EOFError(f"no {marker!r} in {output!r}")
        output += chunk
    return output
