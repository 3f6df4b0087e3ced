"""Runs the example client against `blip2 serve all` (started here on a free loopback port)."""

import os
import pathlib
import socket
import subprocess
import sys
import time

import grpc
import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import blip2_client  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    binary = os.environ.get("BLIP2_BIN", str(ROOT / "target" / "debug" / "blip2"))
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "serve", "all", "--listen", f"127.0.0.1:{port}", "--http-listen", "off"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("blip2 session listening on"):
            break
    else:
        proc.kill()
        pytest.fail("blip2 serve all did not start")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def test_two_turns_with_an_image(server):
    chat = blip2_client.Chat(server, max_new_tokens=8)
    pieces = []
    image = (ROOT / "tests" / "fixtures" / "images" / "photo.jpg").read_bytes()
    done = chat.ask("what colour is the square?", [image], on_piece=pieces.append)
    assert "".join(pieces) == done.text
    assert 1 <= done.usage.generated_tokens <= 8
    chat.ask("and the background?")
    turns = chat.history().turns
    assert [t.question for t in turns] == ["what colour is the square?", "and the background?"]
    assert len(turns[0].image_ids) == 1


def test_unknown_session_is_not_found(server):
    chat = blip2_client.Chat(server)
    chat.session_id = "0" * 32
    with pytest.raises(grpc.RpcError) as error:
        chat.ask("hello")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
