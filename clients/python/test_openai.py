"""The OpenAI-compatible HTTP API of `blip2 serve all`, driven by the official `openai` package.

Starts the binary on free loopback ports (gRPC and HTTP), then chats through
`openai.OpenAI(base_url=http://ADDR/v1)` as any chatbot framework would.
"""

import base64
import os
import pathlib
import subprocess
import sys

import grpc
import openai
import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
IMAGES = ROOT / "tests" / "fixtures" / "images"
sys.path.insert(0, str(HERE))

import blip2_client  # noqa: E402,F401  (generates the gRPC stubs and puts them on sys.path)
from blip2.v1 import vision_pb2, vision_pb2_grpc  # noqa: E402


def _data_uri(name: str) -> str:
    mime = "image/jpeg" if name.endswith(".jpg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode((IMAGES / name).read_bytes()).decode()


@pytest.fixture(scope="module")
def system():
    binary = os.environ.get("BLIP2_BIN", str(ROOT / "target" / "debug" / "blip2"))
    proc = subprocess.Popen(
        [binary, "serve", "all", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    addrs = {}
    for line in proc.stdout:
        if line.startswith("blip2 ") and " listening on " in line:
            tier, addr = line.split()[1], line.rsplit(" ", 1)[1].strip()
            addrs[tier] = addr
        if "session" in addrs:
            break
    if not {"vision", "http", "session"} <= addrs.keys():
        proc.kill()
        pytest.fail(f"blip2 serve all did not announce its tiers: {addrs}")
    client = openai.OpenAI(base_url=f"http://{addrs['http']}/v1", api_key="any-key", max_retries=0)
    vision = vision_pb2_grpc.VisionServiceStub(grpc.insecure_channel(addrs["vision"]))
    yield client, vision
    proc.terminate()
    proc.wait(timeout=30)


def _model(client: openai.OpenAI) -> str:
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def _images_encoded(vision) -> int:
    return vision.Info(vision_pb2.VisionInfoRequest()).images_encoded


def _ask_about(image: str, text: str) -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": _data_uri(image)}},
        ],
    }


def test_non_streaming_chat_with_an_image(system):
    client, _ = system
    completion = client.chat.completions.create(
        model=_model(client),
        messages=[_ask_about("photo.jpg", "What is in the picture?")],
        max_tokens=8,
    )
    choice = completion.choices[0]
    assert completion.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= completion.usage.completion_tokens <= 8
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_streaming_chat_with_an_image(system):
    client, _ = system
    stream = client.chat.completions.create(
        model=_model(client),
        messages=[_ask_about("rgba.png", "Describe the image.")],
        max_completion_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    assert finish in ("stop", "length")
    assert usage is not None and 1 <= usage.completion_tokens <= 8
    assert isinstance("".join(pieces), str)


def test_a_second_turn_reuses_the_image_without_encoding_it_again(system):
    client, vision = system
    model = _model(client)
    before = _images_encoded(vision)
    question = _ask_about("wide.png", "What colour is it?")
    first = client.chat.completions.create(model=model, messages=[question], max_tokens=6)
    assert _images_encoded(vision) == before + 1
    history = [question, {"role": "assistant", "content": first.choices[0].message.content}]
    second = client.chat.completions.create(
        model=model,
        messages=history + [{"role": "user", "content": "And the background?"}],
        max_tokens=6,
    )
    assert isinstance(second.choices[0].message.content, str)
    # The session holding the conversation answered: no new encoding, and the LLM tier read the
    # first turn's prompt (the image's soft prompt included) from its prefix cache.
    assert _images_encoded(vision) == before + 1
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_errors_are_openai_errors(system):
    client, _ = system
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert error.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=_model(client), messages=[{"role": "user", "content": "hi"}], n=2
        )
    assert error.value.status_code == 400
    assert error.value.body["param"] == "n"
