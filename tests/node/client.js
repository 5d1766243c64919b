// A Node client of the contract (@grpc/grpc-js + @grpc/proto-loader): calls Generate and
// GenerateBatch and prints what came back as one JSON object on stdout.
//
//   node tests/node/client.js <host:port> <protos dir> <dir holding google/rpc/status.proto>
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

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
  console.log(JSON.stringify({ generate: generated, batch: batched }));
  client.close();
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});
