"""A crier client generated from proto/crier/v1/crier.proto by grpcio-tools,
at run time: what a service in another language does. Used by tests/it/grpc.rs.

    grpc_client.py ADDR publish TOPIC DATA KEY    -> the reply
    grpc_client.py ADDR subscribe TOPIC LAST_ID N -> the first N events

Prints one JSON object per line.
"""

import importlib
import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

PROTO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")


def stubs():
    out = tempfile.mkdtemp(prefix="crier-grpc-")
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(PROTO_ROOT, "crier", "v1", "crier.proto"),
        ]
    )
    if code != 0:
        sys.exit(f"protoc failed with {code}")
    sys.path.insert(0, out)
    return (
        importlib.import_module("crier.v1.crier_pb2"),
        importlib.import_module("crier.v1.crier_pb2_grpc"),
    )


def main():
    addr, command, *args = sys.argv[1:]
    pb, rpc = stubs()
    with grpc.insecure_channel(addr) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        hub = rpc.CrierStub(channel)
        if command == "publish":
            topic, data, key = args
            reply = hub.Publish(
                pb.PublishRequest(topic=topic, data=data, idempotency_key=key),
                timeout=10,
            )
            print(
                json.dumps(
                    {
                        "topic": reply.topic,
                        "id": reply.id,
                        "seq": reply.seq,
                        "replayed": reply.replayed,
                    }
                )
            )
        elif command == "subscribe":
            topic, last_id, n = args
            call = hub.Subscribe(
                pb.SubscribeRequest(topics=[topic], last_event_id=last_id), timeout=10
            )
            seen = 0
            for item in call:
                if item.WhichOneof("item") != "event":
                    continue
                e = item.event
                print(
                    json.dumps(
                        {
                            "id": e.id,
                            "topic": e.topic,
                            "event": e.event,
                            "data": e.data,
                            "seq": e.seq,
                        }
                    )
                )
                seen += 1
                if seen == int(n):
                    call.cancel()
                    break
        else:
            sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
