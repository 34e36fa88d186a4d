// An independent client of HostAgentServer: connect-es (connect-node) over
// the Connect protocol (JSON and binary, HTTP/1.1 and HTTP/2), gRPC-Web and
// gRPC. The service's types are built at run time by protobuf-es from the
// FileDescriptorSet that protoc writes for proto/ (no code generation).
//
// Run by tests/interop.rs with INTEROP_CONFIG, a JSON object:
//   { "baseUrl": "http://127.0.0.1:PORT", "token": "...",
//     "descriptorSet": "/path/hostagent_descriptor.bin",
//     "sandbox": "sb-...",            // a running sandbox on the agent
//     "seed": "tpl-...",              // a snapshot the agent holds
//     "fresh": ["sb-...", ...] }      // unused sandbox ids, one a transport
// Prints one JSON line per call:
//   {"transport": T, "step": S, "ok": <answer as proto3 JSON>}
//   {"transport": T, "step": S, "code": "not_found", "message": "..."}

import { readFileSync } from "node:fs";
import { createFileRegistry, fromBinary, toJson } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import {
  compressionGzip,
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";

const config = JSON.parse(process.env.INTEROP_CONFIG ?? "{}");
const registry = createFileRegistry(
  fromBinary(FileDescriptorSetSchema, readFileSync(config.descriptorSet)),
);
const service = registry.getService("hostagent.v1.HostAgentService");
if (!service) throw new Error("hostagent.v1.HostAgentService is not in the descriptor set");

const bearer = (token) => (next) => async (req) => {
  req.header.set("authorization", `Bearer ${token}`);
  return next(req);
};

// Every protocol and HTTP version the server is meant to serve.
const transports = {
  "connect-json-h1": (o) => createConnectTransport({ ...o, httpVersion: "1.1" }),
  "connect-json-h2": (o) => createConnectTransport({ ...o, httpVersion: "2" }),
  "connect-binary-h1": (o) =>
    createConnectTransport({ ...o, httpVersion: "1.1", useBinaryFormat: true }),
  // gzip both ways, also for small messages.
  "connect-binary-h2-gzip": (o) =>
    createConnectTransport({
      ...o,
      httpVersion: "2",
      useBinaryFormat: true,
      sendCompression: compressionGzip,
      acceptCompression: [compressionGzip],
      compressMinBytes: 1,
    }),
  "grpc-web-h1": (o) => createGrpcWebTransport({ ...o, httpVersion: "1.1", useBinaryFormat: true }),
  "grpc-web-h2": (o) => createGrpcWebTransport({ ...o, httpVersion: "2", useBinaryFormat: true }),
  "grpc-h2": (o) => createGrpcTransport({ ...o }),
};

function print(transport, step, outcome) {
  process.stdout.write(JSON.stringify({ transport, step, ...outcome }) + "\n");
}

async function call(transport, step, client, method, request) {
  const desc = service.methods.find((m) => m.localName === method);
  try {
    const answer = await client[method](request, { timeoutMs: 10_000 });
    print(transport, step, { ok: toJson(desc.output, answer, { registry }) });
  } catch (e) {
    const err = ConnectError.from(e);
    // Code names as the Connect protocol spells them (not_found, ...).
    const code = Code[err.code].replace(/[A-Z]/g, (c, i) => (i ? "_" : "") + c.toLowerCase());
    print(transport, step, { code, message: err.rawMessage });
  }
}

const names = Object.keys(transports);
for (const [i, name] of names.entries()) {
  const options = { baseUrl: config.baseUrl };
  const client = createClient(
    service,
    transports[name]({ ...options, interceptors: [bearer(config.token)] }),
  );
  const key = `tpl-${name}`;
  const fresh = config.fresh[i];
  await call(name, "GetHostInfo", client, "getHostInfo", {});
  await call(name, "ListSandboxes", client, "listSandboxes", {});
  await call(name, "CreateSnapshot", client, "createSnapshot", { sandboxId: config.sandbox, name: key });
  await call(name, "ListSnapshots", client, "listSnapshots", {});
  await call(name, "DeleteSnapshot", client, "deleteSnapshot", { name: key });
  await call(name, "CreateSandbox", client, "createSandbox", {
    sandboxId: fresh,
    template: config.seed,
    vcpus: 1,
    memoryMb: 256,
  });
  await call(name, "DestroySandbox", client, "destroySandbox", { sandboxId: fresh });
  await call(name, "missing", client, "deleteSnapshot", { name: "tpl-missing" });
  await call(name, "invalid", client, "createSnapshot", { sandboxId: "sb-nope", name: key });

  const stranger = createClient(
    service,
    transports[name]({ ...options, interceptors: [bearer("wrong")] }),
  );
  await call(name, "wrong-token", stranger, "listSnapshots", {});
}
