"""Example Python client of the BLIP-2 session tier, generated from the same protos.

    pip install -r clients/python/requirements.txt
    python clients/python/blip2_client.py --addr 127.0.0.1:50050 --image cat.jpg "What is in the picture?"

The gRPC stubs are generated from proto/ on first import (into clients/python/gen/, not committed),
so they always match the server's protos.
"""

import argparse
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
GEN = HERE / "gen"


def _generate_stubs() -> None:
    from grpc_tools import protoc

    GEN.mkdir(exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "blip2" / "v1").glob("*.proto"))
    stamp = GEN / ".stamp"
    newest = max((PROTO_ROOT / p).stat().st_mtime for p in protos)
    if stamp.exists() and stamp.stat().st_mtime >= newest:
        return
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={GEN}", f"--grpc_python_out={GEN}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(protos))
    for package in (GEN / "blip2", GEN / "blip2" / "v1"):
        (package / "__init__.py").touch()
    stamp.touch()


_generate_stubs()
sys.path.insert(0, str(GEN))

import grpc  # noqa: E402
from blip2.v1 import common_pb2, session_pb2, session_pb2_grpc  # noqa: E402


class Chat:
    """One conversation with the session tier."""

    def __init__(self, addr: str, max_new_tokens: int | None = None):
        self.channel = grpc.insecure_channel(addr)
        self.stub = session_pb2_grpc.SessionServiceStub(self.channel)
        params = common_pb2.GenerationParams()
        if max_new_tokens is not None:
            params.max_new_tokens = max_new_tokens
        self.session_id = self.stub.CreateSession(
            session_pb2.CreateSessionRequest(default_params=params)
        ).session_id

    def ask(self, text: str, images: list[bytes] = (), on_piece=None) -> session_pb2.ChatDone:
        """Asks one question; streams pieces to on_piece; returns the final event."""
        request = session_pb2.ChatRequest(
            session_id=self.session_id,
            text=text,
            images=[session_pb2.TurnImage(data=data) for data in images],
        )
        done = None
        for event in self.stub.Chat(request):
            kind = event.WhichOneof("kind")
            if kind == "text" and on_piece is not None:
                on_piece(event.text)
            elif kind == "done":
                done = event.done
        if done is None:
            raise RuntimeError("the stream ended without a final event")
        return done

    def history(self) -> session_pb2.Session:
        return self.stub.GetSession(session_pb2.GetSessionRequest(session_id=self.session_id))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50050")
    parser.add_argument("--image", action="append", default=[], type=pathlib.Path)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("question")
    args = parser.parse_args()
    chat = Chat(args.addr, args.max_new_tokens)
    images = [p.read_bytes() for p in args.image]
    try:
        done = chat.ask(args.question, images, on_piece=lambda p: print(p, end="", flush=True))
    except grpc.RpcError as error:
        print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(f"\n[{done.usage.prompt_tokens} prompt + {done.usage.generated_tokens} generated tokens]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
