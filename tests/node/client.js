// A Node client of the contract (@grpc/grpc-js + @grpc/proto-loader): calls Generate and
// GenerateBatch and prints what came back as one JSON object on stdout, with the
// google.rpc.Status details of one refusal read from its grpc-status-details-bin trailer
// (decoded with protobufjs and the google.rpc protos).
//
//   node tests/node/client.js <host:port> <protos dir> <dir holding google/rpc/status.proto>
"use strict";

const path = require("path");
const fs = require("fs");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const [target, protosDir, googleDir] = process.argv.slice(2);
if (!target || !protosDir || !googleDir) {
  console.error("usage: node client.js <host:port> <protos dir> <googleapis protos dir>");
  process.exit(2);
}

const definition = protoLoader.loadSync(path.join(protosDir, "genstruct/v1/genstruct.proto"), {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [protosDir, googleDir],
});
const genstruct = grpc.loadPackageDefinition(definition).genstruct.v1;
const client = new genstruct.GenstructService(target, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 10000);

function generate() {
  return new Promise((resolve, reject) => {
    const metadata = new grpc.Metadata();
    metadata.set("x-request-id", "node-1");
    const request = {
      id: "node-doc",
      document: { title: "Tides", content: "Tides are caused by the Moon." },
      sampling: { temperature: 0.2, max_tokens: 64 },
      num_generations: 2,
    };
    // A unary response carries x-request-id in its trailers, which come with the status;
    // settle once both the callback and the status have arrived, in whichever order.
    let outcome = null;
    let trailers = null;
    const settle = () => {
      if (outcome === null || trailers === null) return;
      if (outcome.err) reject(outcome.err);
      else resolve({ response: outcome.response, requestId: trailers.get("x-request-id")[0] || null });
    };
    const call = client.Generate(request, metadata, { deadline: deadline() }, (err, response) => {
      outcome = { err, response };
      settle();
    });
    call.on("status", (status) => {
      trailers = status.metadata;
      settle();
    });
  });
}

// google.rpc.Status and its details, resolved from the googleapis protos (protobufjs knows
// google/protobuf/*.proto itself).
const rpcProtos = new protobuf.Root();
rpcProtos.resolvePath = (origin, target) => {
  const local = path.join(googleDir, target);
  return fs.existsSync(local) ? local : target;
};
rpcProtos.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });

function statusDetails(metadata) {
  const [bytes] = metadata.get("grpc-status-details-bin");
  if (!bytes) return null;
  const status = rpcProtos.lookupType("google.rpc.Status").decode(bytes);
  const details = status.details.map((any) => {
    const type = rpcProtos.lookupType(any.type_url.slice(any.type_url.lastIndexOf("/") + 1));
    return { type: type.fullName.slice(1), value: type.toObject(type.decode(any.value)) };
  });
  return { code: status.code, message: status.message, details };
}

function refusal() {
  // an empty document: INVALID_ARGUMENT, with ErrorInfo and BadRequest in the trailer
  return new Promise((resolve, reject) => {
    const request = { id: "empty", document: { title: "Empty", content: "" } };
    client.Generate(request, new grpc.Metadata(), { deadline: deadline() }, (err) => {
      if (!err) reject(new Error("an empty document was not refused"));
      else resolve({ code: err.code, details: err.details, status: statusDetails(err.metadata) });
    });
  });
}

function batch() {
  return new Promise((resolve, reject) => {
    const results = [];
    const call = client.GenerateBatch(new grpc.Metadata(), { deadline: deadline() });
    call.on("data", (response) => results.push(response));
    call.on("error", reject);
    call.on("end", () => resolve(results));
    call.write({ id: "a", document: { title: "A", content: "First document." } });
    call.write({ id: "bad", document: { title: "B", content: "" } });
    call.write({ id: "c", document: { title: "C", content: "Third document." } });
    call.end();
  });
}

async function main() {
  const generated = await generate();
  const batched = await batch();
  const refused = await refusal();
  console.log(JSON.stringify({ generate: generated, batch: batched, refusal: refused }));
  client.close();
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});
