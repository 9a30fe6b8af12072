// Calls a running loraplex server with @grpc/grpc-js, knowing only the .proto files in protos/, and prints
// one JSON object with what each call returned; tests/test_node_interop.py checks it.
//   node tests/node/interop.js HOST:PORT
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const root = path.join(__dirname, "..", "..", "protos");
const files = ["loraplex/v1/generation.proto", "grpc/health/v1/health.proto"];
const definition = protoLoader.loadSync(files, {includeDirs: [root], keepCase: true, longs: Number,
                                                enums: String, defaults: true, oneofs: true});
const api = grpc.loadPackageDefinition(definition);
const target = process.argv[2];
const generation = new api.loraplex.v1.GenerationService(target, grpc.credentials.createInsecure());
const health = new api.grpc.health.v1.Health(target, grpc.credentials.createInsecure());

const unary = (client, method, request) => new Promise((resolve, reject) =>
  client[method](request, {deadline: Date.now() + 60000}, (err, reply) => (err ? reject(err) : resolve(reply))));

function stream(request) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    const call = generation.GenerateStream(request, {deadline: Date.now() + 60000});
    call.on("data", (chunk) => chunks.push(chunk));
    call.on("error", reject);
    call.on("end", () => resolve(chunks));
  });
}

async function main() {
  const greedy = {text: "The weather today is",
                  params: {stopping: {max_new_tokens: 8, min_new_tokens: 8},
                           response: {token_logprobs: true}}};
  const out = {};
  out.health = (await unary(health, "Check", {service: ""})).status;
  out.model = await unary(generation, "ModelInfo", {});
  out.tokenize = await unary(generation, "Tokenize", {text: "Hello world", return_tokens: true});
  const whole = await unary(generation, "Generate", greedy);
  out.generate = {text: whole.text, token_ids: whole.tokens.map((t) => t.token_id),
                  stop_reason: whole.stop_reason, generated_token_count: whole.generated_token_count};
  const chunks = await stream(greedy);
  out.stream = {text: chunks.map((c) => c.text).join(""),
                token_ids: chunks.flatMap((c) => c.tokens.map((t) => t.token_id)),
                stop_reason: chunks[chunks.length - 1].stop_reason};
  try {
    await unary(generation, "Generate", {text: "", params: {}});
    out.empty_prompt = "OK";
  } catch (err) {
    out.empty_prompt = {code: grpc.status[err.code], details: err.details};
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().then(() => process.exit(0), (err) => { console.error(err); process.exit(1); });
