"""An independent gRPC client of HostAgentServer: grpcio, with stubs that
grpcio-tools generates from proto/ when this runs.

Run by tests/interop.rs as `python3 client.py CONFIG_JSON`, where the config
is {"target": "127.0.0.1:PORT", "token": "...", "proto": "<repo>/proto",
"out": "<temp dir>", "sandbox": "sb-...", "seed": "tpl-...",
"fresh": ["sb-...", ...]}. Prints one JSON line per call:
  {"transport": T, "step": S, "ok": <answer as proto3 JSON>}
  {"transport": T, "step": S, "code": "not_found", "message": "..."}
"""

import json
import sys

import grpc
from grpc_tools import protoc
from google.protobuf import json_format


def generate(proto, out):
    args = [
        "grpc_tools.protoc",
        f"-I{proto}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "hostagent/v1/hostagent.proto",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("grpc_tools.protoc failed")
    sys.path.insert(0, out)


def main():
    config = json.loads(sys.argv[1])
    generate(config["proto"], config["out"])
    from hostagent.v1 import hostagent_pb2 as pb
    from hostagent.v1 import hostagent_pb2_grpc as pb_grpc

    def run(transport, channel, token, fresh):
        stub = pb_grpc.HostAgentServiceStub(channel)
        metadata = [("authorization", f"Bearer {token}")]

        def call(step, method, request, **options):
            line = {"transport": transport, "step": step}
            try:
                answer = getattr(stub, method)(
                    request, metadata=metadata, timeout=10, **options
                )
                line["ok"] = json.loads(json_format.MessageToJson(answer))
            except grpc.RpcError as e:
                line["code"] = e.code().name.lower()
                line["message"] = e.details()
            print(json.dumps(line), flush=True)

        key = f"tpl-{transport}"
        call("GetHostInfo", "GetHostInfo", pb.GetHostInfoRequest())
        call("ListSandboxes", "ListSandboxes", pb.ListSandboxesRequest())
        call(
            "CreateSnapshot",
            "CreateSnapshot",
            pb.CreateSnapshotRequest(sandbox_id=config["sandbox"], name=key),
        )
        call("ListSnapshots", "ListSnapshots", pb.ListSnapshotsRequest())
        call("DeleteSnapshot", "DeleteSnapshot", pb.DeleteSnapshotRequest(name=key))
        call(
            "CreateSandbox",
            "CreateSandbox",
            pb.CreateSandboxRequest(
                sandbox_id=fresh, template=config["seed"], vcpus=1, memory_mb=256
            ),
        )
        call(
            "DestroySandbox",
            "DestroySandbox",
            pb.DestroySandboxRequest(sandbox_id=fresh),
        )
        call("missing", "DeleteSnapshot", pb.DeleteSnapshotRequest(name="tpl-missing"))
        call(
            "invalid",
            "CreateSnapshot",
            pb.CreateSnapshotRequest(sandbox_id="sb-nope", name=key),
        )
        metadata = [("authorization", "Bearer wrong")]
        call("wrong-token", "ListSnapshots", pb.ListSnapshotsRequest())

    # Plain, and gzip-compressed both ways (requests and answers).
    with grpc.insecure_channel(config["target"]) as channel:
        run("grpcio", channel, config["token"], config["fresh"][0])
    with grpc.insecure_channel(
        config["target"], compression=grpc.Compression.Gzip
    ) as channel:
        run("grpcio-gzip", channel, config["token"], config["fresh"][1])


if __name__ == "__main__":
    main()
