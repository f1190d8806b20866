// One step of an exported hyperadam learned optimizer on a Float32Array, with onnxruntime-node.
//
//   node step.mjs FOLDER INPUT.json OUTPUT.json
//
// FOLDER is an exported optimizer folder (manifest.json + fused.onnx + ...). INPUT.json holds
//   {"w": [...], "grad": [...], "lr": 0.005, "weight_decay": 0.0, "state": {"h": [...], ...}}
// where w and grad are the model's n parameters and gradient, lr is optional (default: the
// manifest's), weight_decay is optional (default 0: AdamW's decoupled decay, w scaled by the
// float32 1 - lr*weight_decay before the learned update, as the Python runtime does), and
// state is optional (default: zeros, the state before the first step). A state
// entry is the graph layout: a per-coordinate field of k features is k*n numbers, feature-major
// (all n values of feature 0, then feature 1, ...); a carried value (HyperAdam's m_col_sum_sq)
// is its own shape. OUTPUT.json receives {"w": [...], "state": {...}} in the same layout.
//
// The fused graph is one whole step of a model that is one chunk, which is what a single
// Float32Array is here. The manifest's format version, each graph's file name (a plain name in
// the folder) and the file's sha256 are checked first.
//
// Per-array statistics (the tensor-wise HyperAdam, methods "hyperadam-tensor*"; the manifest's
// "per_array_statistics"): the Float32Array is one tensor T, so the step first runs the
// array_terms graph (g -> g^2 per coordinate; the adaptive variant's also reads the state and
// adds g^2, g*D, D^2 with D its previous step direction, the trend variant's g^2, g*y, y^2 with
// y the beta = 0.99 momentum row of feat_m), averages each row over the n
// coordinates in double precision (sums it, for the rows listed under "summed") and feeds the
// results to every coordinate as "array_means". A model of several arrays would reduce each
// array's coordinates on its own. Its step count "t" is carried in the state like HyperAdam's
// m_col_sum_sq; the adaptive and trend variants' step scale "log_scale" is a per-coordinate
// field.

import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import ort from "onnxruntime-node";

const FORMAT = "hyperadam.exported-optimizer";
const SUPPORTED_VERSIONS = [1];

function fail(message) {
  console.error(`step.mjs: ${message}`);
  process.exit(2);
}

function isPlainName(name) {
  return name !== "" && name !== "." && name !== ".." && !/[\\/\0]/.test(name);
}

// The per-array statistics this example knows how to compute (the Python runtime's list).
const KNOWN_STATISTICS = [
  "grad_sq",
  "grad_sq_sum",
  "grad_dot_last_step_sum",
  "last_step_sq_sum",
  "grad_dot_trend_sum",
  "trend_sq_sum",
];

function checkGraphFile(folder, manifest, role) {
  const file = manifest.graphs[role]?.file;
  // A plain name inside the folder, as the Python runtime requires: "../x" or "/x" would load
  // (and run) a graph from anywhere, hashed against a manifest entry the same edit adds.
  if (typeof file !== "string" || !isPlainName(file) || !(file in manifest.files)) {
    fail(`${folder}: graph file ${JSON.stringify(file)} is not a plain file name listed in manifest.json`);
  }
  const digest = createHash("sha256").update(readFileSync(join(folder, file))).digest("hex");
  if (digest !== manifest.files[file]) {
    fail(`${file} does not match its sha256 in manifest.json: the folder was modified after export`);
  }
}

function loadManifest(folder) {
  const manifest = JSON.parse(readFileSync(join(folder, "manifest.json"), "utf8"));
  if (manifest.format !== FORMAT || !SUPPORTED_VERSIONS.includes(manifest.format_version)) {
    fail(`${folder}: not a supported exported optimizer (${manifest.format} v${manifest.format_version})`);
  }
  const statistics = manifest.per_array_statistics;
  if (statistics !== undefined) {
    const terms = statistics.terms ?? [];
    const summed = statistics.summed ?? [];
    if (terms.length === 0 || !terms.every((t) => KNOWN_STATISTICS.includes(t))) {
      fail(`${folder}: per-array statistics ${JSON.stringify(terms)} are not known to this example`);
    }
    if (!Array.isArray(summed) || !summed.every((t) => terms.includes(t))) {
      fail(`${folder}: summed statistics ${JSON.stringify(summed)} are not among its terms`);
    }
    checkGraphFile(folder, manifest, statistics.graph);
  }
  checkGraphFile(folder, manifest, "fused");
  return manifest;
}

async function run(folder, spec, feeds) {
  const session = await ort.InferenceSession.create(join(folder, spec.file), {
    executionProviders: ["cpu"],
    graphOptimizationLevel: "all",
  });
  return session.run(feeds);
}

// Each statistic's mean over the array (its sum, for a summed one), repeated for every
// coordinate: the [S, n] array_means.
async function arrayMeans(folder, manifest, given, n) {
  const statistics = manifest.per_array_statistics;
  const spec = manifest.graphs[statistics.graph];
  const terms = (await run(folder, spec, feedsFor(spec, given, n)))[spec.outputs[0].name].data;
  const means = new Float32Array(terms.length);
  statistics.terms.forEach((name, k) => {
    let sum = 0; // double precision, as the Python runtime's float64 sums
    for (let i = 0; i < n; i++) sum += terms[k * n + i];
    const summed = (statistics.summed ?? []).includes(name);
    means.fill(summed ? sum : n > 0 ? sum / n : 0, k * n, (k + 1) * n);
  });
  return means;
}

// The graph input's shape with the coordinate axis "n" replaced by the model size.
function concreteShape(spec, n) {
  return spec.shape.map((d) => (d === "n" ? n : d));
}

// float32 tensors for every input of a graph: the given values, zeros for a state not given.
function feedsFor(spec, given, n) {
  const feeds = {};
  for (const tensor of spec.inputs) {
    const shape = concreteShape(tensor, n);
    const size = shape.reduce((a, b) => a * b, 1);
    const values = given[tensor.name] ?? new Array(size).fill(0);
    if (values.length !== size) {
      fail(`input ${tensor.name} needs ${size} values (shape [${shape}]), got ${values.length}`);
    }
    feeds[tensor.name] = new ort.Tensor("float32", Float32Array.from(values), shape);
  }
  return feeds;
}

async function main() {
  const [folder, inputPath, outputPath] = process.argv.slice(2);
  if (!outputPath) fail("usage: node step.mjs FOLDER INPUT.json OUTPUT.json");
  const manifest = loadManifest(folder);
  const input = JSON.parse(readFileSync(inputPath, "utf8"));
  const n = input.w.length;
  if (input.grad.length !== n) fail(`grad has ${input.grad.length} values but w has ${n}`);
  const lr = input.lr ?? manifest.default_lr;
  const decay = input.weight_decay ?? 0;
  if (!(Number.isFinite(decay) && decay >= 0)) fail(`weight_decay must be a finite number >= 0, got ${decay}`);
  // float32 arithmetic: the product of two float32 values is exact in a double, so one
  // Math.fround rounds it exactly as a float32 multiply would.
  const factor = Math.fround(1 - lr * decay);
  const w = decay ? input.w.map((x) => Math.fround(Math.fround(x) * factor)) : input.w;
  const given = {
    w,
    grad: input.grad,
    lr: [lr],
    ...(input.state ?? {}),
  };
  if (manifest.per_array_statistics !== undefined) {
    given[manifest.per_array_statistics.input] = await arrayMeans(folder, manifest, given, n);
  }

  const spec = manifest.graphs.fused;
  const results = await run(folder, spec, feedsFor(spec, given, n));
  const state = {};
  for (const tensor of spec.outputs) {
    if (tensor.name === "w_new") continue;
    state[tensor.name.replace(/_new$/, "")] = Array.from(results[tensor.name].data);
  }
  writeFileSync(outputPath, JSON.stringify({ w: Array.from(results.w_new.data), state }));
}

main().catch((err) => fail(err.stack ?? String(err)));
