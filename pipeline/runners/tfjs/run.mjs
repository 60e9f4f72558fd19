#!/usr/bin/env node
// Runs a TF.js model on the wasm backend, the way a web app runs it: a graph model (model.json
// "format": "graph-model", from tensorflowjs_converter) or a layers model ("layers-model", as
// Teachable Machine and tfjs-layers' model.save write them).
//
//   node run.mjs --model DIR --input images.bin --shape N,H,W,3 --output probs.bin \
//                [--input-name NAME] [--output-key NAME] [--batch 16] [--latency-runs 30]
//
// --input-name picks the model input the images go to (default: its only input); --output-key the
// output to return (default: the one named `probabilities`, else the only one). A graph model's
// names are its signature keys, structuredOutputKeys or graph node names (`Identity:0`); a layers
// model's are its input and output layer names.
//
// The input file holds raw little-endian float32 images, read --batch images at a time (never the
// whole file at once), fed to the model as they are; the output file receives raw float32 [N, C].
// The agreement pass runs --batch images a call; then --latency-runs single-image calls are timed
// after a warm-up call. On success one JSON line goes to stdout:
//   {"shape":[N,C],"latency_ms":<median>,"latencies_ms":[...],"agreement_pass_ms":<batched pass>,
//    "format":"graph-model","input":"<name used>","output":"<name used>","batch":16,
//    "backend":"wasm","tfjs":"4.22.0"}
// On failure the exit status is non-zero and the last stderr line says why.
//
// tfjs-node cannot be installed offline (its install script downloads libtensorflow), so the
// model files are read here and handed to plain tfjs: `file://` URLs only load in tfjs-node.

import { closeSync, openSync, readFileSync, readSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

// tfjs ships CommonJS only (no "exports" map); the default import is its module.exports.
import tf from '@tensorflow/tfjs';
import wasm from '@tensorflow/tfjs-backend-wasm';

const HERE = dirname(fileURLToPath(import.meta.url));
const WASM_DIR = join(HERE, 'node_modules', '@tensorflow', 'tfjs-backend-wasm', 'dist') + '/';

class UsageError extends Error {}

function parseCli(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        model: { type: 'string' },
        input: { type: 'string' },
        shape: { type: 'string' },
        output: { type: 'string' },
        'input-name': { type: 'string' },
        'output-key': { type: 'string' },
        batch: { type: 'string', default: '16' },
        'latency-runs': { type: 'string', default: '30' },
      },
      strict: true,
    }));
  } catch (err) {
    throw new UsageError(err.message);
  }
  const missing = ['model', 'input', 'shape', 'output'].filter((k) => values[k] === undefined);
  if (missing.length > 0) {
    throw new UsageError(`missing ${missing.map((k) => `--${k}`).join(', ')}`);
  }
  const shape = values.shape.split(',').map(Number);
  if (shape.length !== 4 || shape.some((d) => !Number.isInteger(d) || d <= 0) || shape[3] !== 3) {
    throw new UsageError(`--shape must be N,H,W,3 with positive integers, got '${values.shape}'`);
  }
  const batch = Number(values.batch);
  const latencyRuns = Number(values['latency-runs']);
  if (!Number.isInteger(batch) || batch < 1 || !Number.isInteger(latencyRuns) || latencyRuns < 0) {
    throw new UsageError(`--batch must be >= 1 and --latency-runs >= 0, got ${values.batch}, ${values['latency-runs']}`);
  }
  return {
    batch,
    latencyRuns,
    modelDir: values.model,
    inputPath: values.input,
    shape,
    outputPath: values.output,
    inputName: values['input-name'] ?? null,
    outputKey: values['output-key'] ?? null,
  };
}

function readJson(path) {
  let text;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new Error(`cannot read ${path}: ${err.code ?? err.message}`);
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new Error(`${path} is not valid JSON (${err.message})`);
  }
}

/** Reads model.json and its shards into ModelArtifacts, checking every shard's size. */
async function loadArtifacts(modelDir) {
  const modelJsonPath = join(modelDir, 'model.json');
  const modelJson = readJson(modelJsonPath);
  if (modelJson.modelTopology == null || !Array.isArray(modelJson.weightsManifest)) {
    throw new Error(`${modelJsonPath} has no modelTopology/weightsManifest; is it a TF.js model?`);
  }
  return tf.io.getModelArtifactsForJSON(modelJson, async (manifest) => {
    const specs = [];
    const buffers = [];
    for (const group of manifest) {
      specs.push(...group.weights);
      for (const shard of group.paths) {
        const shardPath = join(modelDir, shard);
        let bytes;
        try {
          bytes = readFileSync(shardPath);
        } catch (err) {
          throw new Error(`cannot read weight shard ${shardPath}: ${err.code ?? err.message}`);
        }
        buffers.push(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
      }
    }
    const weightData = tf.io.concatenateArrayBuffers(buffers);
    const sizes = specs.map(weightByteLength);
    const expected = sizes.includes(null) ? null : sizes.reduce((a, b) => a + b, 0);
    // tfjs would otherwise read past the end into garbage or fail with an opaque RangeError.
    if (expected !== null && weightData.byteLength !== expected) {
      throw new Error(
        `weight shards in ${modelDir} hold ${weightData.byteLength} bytes but model.json ` +
          `describes ${expected}; the bundle is truncated or mixed from two conversions`,
      );
    }
    return [specs, weightData];
  });
}

const BYTES_PER_ELEMENT = {
  float32: 4,
  int32: 4,
  bool: 1,
  complex64: 8,
  uint8: 1,
  uint16: 2,
  float16: 2,
};

/** Bytes a weight takes in its shard; null when that is not fixed (strings) or not known. */
function weightByteLength(spec) {
  const bytes = BYTES_PER_ELEMENT[spec.quantization?.dtype ?? spec.dtype];
  return bytes === undefined ? null : spec.shape.reduce((a, b) => a * b, 1) * bytes;
}

const DEFAULT_OUTPUT = 'probabilities';

/*
 * A model's inputs and outputs, each described as {names, shape, dtype, ...}: `names[0]` is the
 * name reported back and listed in errors, the rest are aliases a user may type (a graph output is
 * known by its signature key, its structuredOutputKey and its tensor name). `shape` uses null for
 * an unknown size; `shape` and `dtype` are null where the model does not say.
 */

const TF_DTYPES = { DT_FLOAT: 'float32', DT_INT32: 'int32', DT_BOOL: 'bool', DT_STRING: 'string' };

function signatureShape(info) {
  const shape = info.tensorShape;
  if (shape == null || shape.unknownRank) return null;
  return (shape.dim ?? []).map((d) => (Number(d.size) >= 0 ? Number(d.size) : null));
}

function signatureDtype(info) {
  if (info.dtype == null) return null;
  return TF_DTYPES[info.dtype] ?? info.dtype.replace(/^DT_/, '').toLowerCase();
}

function fromNodeInfo(info) {
  const bare = info.name.replace(/:0$/, '');
  const names = [...new Set([info.name, bare, `${bare}:0`])];
  const shape = Array.isArray(info.shape) ? info.shape.map((d) => (d >= 0 ? d : null)) : null;
  return { names, node: info.name, shape, dtype: info.dtype ?? null };
}

/**
 * The graph model's inputs and outputs, from its signature.
 *
 * The converter names a signature output by its SavedModel key only when no other output has the
 * same dtype and shape; `probabilities` and `logits` are both [-1, C], so both end up keyed by
 * tensor name (`Identity:0`, `Identity_1:0`). Converting with `use_structured_outputs_names=True`
 * adds `userDefinedMetadata.structuredOutputKeys`, the sorted keys in signature-output order;
 * GraphModel.predict pairs them the same way. Older converters wrote no signature (or one without
 * tensor names): the graph's own placeholders and sinks stand in for it.
 */
function graphTensors(artifacts, model) {
  const signature = artifacts.userDefinedMetadata?.signature ?? artifacts.signature ?? {};
  const named = (entries) =>
    entries.length > 0 && entries.every(([, info]) => typeof info?.name === 'string');
  const inputEntries = Object.entries(signature.inputs ?? {});
  const outputEntries = Object.entries(signature.outputs ?? {});
  const fromSignature = ([key, info]) => ({
    names: [...new Set([key, info.name, info.name.replace(/:0$/, '')])],
    node: info.name,
    shape: signatureShape(info),
    dtype: signatureDtype(info),
  });
  const inputs = named(inputEntries)
    ? inputEntries.map(fromSignature)
    : model.inputs.map(fromNodeInfo);
  let outputs = model.outputs.map(fromNodeInfo);
  let lostNames = false;
  if (named(outputEntries)) {
    outputs = outputEntries.map(fromSignature);
    const structuredKeys = artifacts.userDefinedMetadata?.structuredOutputKeys ?? [];
    if (structuredKeys.length === outputs.length) {
      outputs.forEach((output, i) => output.names.unshift(structuredKeys[i]));
    } else {
      lostNames = outputs.length > 1 && outputEntries.some(([key]) => key.includes(':'));
    }
  }
  const nodeNames = new Set((artifacts.modelTopology.node ?? []).map((node) => node.name));
  return {
    inputs,
    outputs,
    /** Any node of the graph (`name` or `name:k`), for outputs the signature does not list. */
    node(name) {
      if (!nodeNames.has(name.replace(/:\d+$/, ''))) return null;
      return { names: [name], node: name, shape: null, dtype: null };
    },
    hint: lostNames
      ? ' (outputs of equal shape lose their names unless converted with ' +
        'use_structured_outputs_names=True)'
      : '',
  };
}

/**
 * Picks the tensor named `requested`, or the default: the one named `preferred` if any, else the
 * only one. `kind` ("input", "signature output", ...) and `flag` (the edgepipe option that names
 * one) word the errors, which list the names that exist; `node` finds names the list lacks.
 */
function pick(candidates, requested, { kind, flag, preferred = null, node = () => null, hint = '' }) {
  const list = candidates.map((c) => c.names[0]).join(', ') || 'none';
  if (requested !== null) {
    const found = candidates.find((c) => c.names.includes(requested)) ?? node(requested);
    if (found) return { ...found, names: [requested, ...found.names.filter((n) => n !== requested)] };
    throw new Error(`no ${kind} '${requested}'; the model has: ${list}${hint}`);
  }
  const named = candidates.find((c) => preferred !== null && c.names.includes(preferred));
  if (named) return named;
  if (candidates.length === 1) return candidates[0];
  const none = preferred === null ? 'the model has' : `no ${kind} '${preferred}' and`;
  throw new Error(
    `${none} ${candidates.length} ${kind}s to choose from: ${list}; choose one with ${flag} NAME${hint}`,
  );
}

/**
 * Checks that `input` takes the feed: float32 image batches [N, H, W, 3] of the feed's size.
 * Returns the images per call the model allows (a graph frozen with batch 1 takes one at a time).
 */
function checkImageInput(input, [, h, w, c], batch) {
  const name = input.names[0];
  if (input.dtype !== null && input.dtype !== 'float32') {
    throw new Error(`input '${name}' is ${input.dtype}; run.mjs feeds float32 images`);
  }
  const shape = input.shape;
  if (shape === null) return batch;
  const shown = `[${shape.map((d) => d ?? -1).join(',')}]`;
  if (shape.length !== 4 || (shape[3] !== null && shape[3] !== c)) {
    throw new Error(`input '${name}' has shape ${shown}, not an image batch [N,H,W,3]`);
  }
  if ((shape[1] !== null && shape[1] !== h) || (shape[2] !== null && shape[2] !== w)) {
    const size = `${shape[1] ?? '?'}x${shape[2] ?? '?'}`;
    throw new Error(`input '${name}' takes ${size} images, the feed holds ${h}x${w}`);
  }
  if (shape[0] === null) return batch;
  if (shape[0] === 1) return 1;
  throw new Error(
    `input '${name}' has a fixed batch of ${shape[0]} (${shown}); run.mjs needs 1 or any`,
  );
}

/**
 * Loads a graph model; `infer(batch)` returns the chosen output.
 *
 * Graphs with control flow only run through executeAsync; plain feed-forward ones run through the
 * cheaper synchronous path. The first call (the warm-up, outside the timing) picks which one.
 */
async function openGraphModel(artifacts, args) {
  const model = await tf.loadGraphModel({ load: async () => artifacts });
  const tensors = graphTensors(artifacts, model);
  const input = pick(tensors.inputs, args.inputName, {
    kind: 'input',
    flag: '--input',
    node: tensors.node,
  });
  const output = pick(tensors.outputs, args.outputKey, {
    kind: 'signature output',
    flag: '--output',
    preferred: DEFAULT_OUTPUT,
    node: tensors.node,
    hint: tensors.hint,
  });
  let runAsync = false;
  async function run(batch) {
    const feed = { [input.node]: batch };
    return runAsync ? model.executeAsync(feed, output.node) : model.execute(feed, output.node);
  }
  return {
    input,
    output,
    async infer(batch) {
      try {
        return await run(batch);
      } catch (err) {
        if (runAsync || !/executeAsync/.test(err.message)) throw err;
        runAsync = true;
        return run(batch);
      }
    },
  };
}

/** Loads a layers model; `infer(batch)` returns the chosen output of `model.predict`. */
async function openLayersModel(artifacts, args) {
  const model = await tf.loadLayersModel({ load: async () => artifacts });
  // Named by layer: a Sequential has no inputNames/outputNames, and tfjs renames the symbolic
  // tensors (`scores/scores_1`) when another model in the process used the same names.
  const described = (symbolic, i) => ({
    names: [...new Set([symbolic.sourceLayer.name, symbolic.name])],
    index: i,
    shape: symbolic.shape,
    dtype: symbolic.dtype ?? null,
  });
  const inputs = model.inputs.map(described);
  const outputs = model.outputs.map(described);
  if (inputs.length > 1) {
    // predict() needs a value for every input; run.mjs has images for one.
    const list = inputs.map((c) => c.names[0]).join(', ');
    throw new Error(
      `the layers model has ${inputs.length} inputs (${list}); run.mjs feeds one image input`,
    );
  }
  const input = pick(inputs, args.inputName, { kind: 'input', flag: '--input' });
  const output = pick(outputs, args.outputKey, {
    kind: 'output',
    flag: '--output',
    preferred: DEFAULT_OUTPUT,
  });
  return {
    input,
    output,
    async infer(batch) {
      const result = model.predict(batch, { batchSize: batch.shape[0] });
      const all = Array.isArray(result) ? result : [result];
      all.forEach((t, i) => i !== output.index && t.dispose());
      return all[output.index];
    },
  };
}

const OPENERS = { 'graph-model': openGraphModel, 'layers-model': openLayersModel };

/** The model.json format; files without one are told apart by their topology (a GraphDef has nodes). */
function modelFormat(artifacts, modelDir) {
  const guessed = Array.isArray(artifacts.modelTopology?.node) ? 'graph-model' : 'layers-model';
  const format = artifacts.format ?? guessed;
  if (!(format in OPENERS)) {
    throw new Error(
      `${join(modelDir, 'model.json')} has format '${format}'; expected graph-model or layers-model`,
    );
  }
  return format;
}

/** Reads images [start, start + count) of the raw float32 file; checks its size once. */
function imageReader(path, shape) {
  let fd;
  try {
    fd = openSync(path, 'r');
  } catch (err) {
    throw new Error(`cannot read input ${path}: ${err.code ?? err.message}`);
  }
  const perImage = shape[1] * shape[2] * shape[3];
  const expected = shape[0] * perImage * 4;
  const probe = Buffer.alloc(1);
  // The file may hold more images than are asked for (the first of a feed, for latency).
  if (expected > 0 && readSync(fd, probe, 0, 1, expected - 1) !== 1) {
    closeSync(fd);
    throw new Error(`input ${path} is shorter than float32 of shape ${shape.join('x')} (${expected} bytes)`);
  }
  return {
    read(start, count) {
      // A fresh, aligned buffer: a Buffer's pool offset need not be a multiple of 4.
      const out = new Float32Array(count * perImage);
      readSync(fd, new Uint8Array(out.buffer), 0, out.byteLength, start * perImage * 4);
      return out;
    },
    close() {
      closeSync(fd);
    },
  };
}

function median(values) {
  if (values.length === 0) return null;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

async function main() {
  const args = parseCli(process.argv.slice(2));

  wasm.setWasmPaths(WASM_DIR);
  if (!(await tf.setBackend('wasm'))) {
    throw new Error(`the wasm backend failed to initialise (wasm files in ${WASM_DIR})`);
  }
  await tf.ready();

  const artifacts = await loadArtifacts(args.modelDir);
  const format = modelFormat(artifacts, args.modelDir);
  const model = await OPENERS[format](artifacts, args);
  const batchSize = checkImageInput(model.input, args.shape, args.batch);
  const outputName = model.output.names[0];

  const [n, h, w, c] = args.shape;
  const images = imageReader(args.inputPath, args.shape);

  async function infer(pixels, count) {
    const batch = tf.tensor4d(pixels, [count, h, w, c]);
    try {
      const output = await model.infer(batch);
      try {
        return { values: await output.data(), shape: output.shape };
      } finally {
        output.dispose();
      }
    } finally {
      batch.dispose();
    }
  }

  const first = images.read(0, 1);
  await infer(first, 1);

  let numClasses = null;
  let flat = null;
  const passStart = performance.now();
  for (let start = 0; start < n; start += batchSize) {
    const count = Math.min(batchSize, n - start);
    const { values, shape } = await infer(images.read(start, count), count);
    if (shape.length !== 2 || shape[0] !== count) {
      throw new Error(`output '${outputName}' has shape [${shape}], expected [${count}, C]`);
    }
    if (flat === null) {
      numClasses = shape[1];
      flat = new Float32Array(n * numClasses);
    }
    flat.set(values, start * numClasses);
  }
  const passMs = performance.now() - passStart;
  images.close();
  writeFileSync(args.outputPath, new Uint8Array(flat.buffer));

  const latencies = [];
  if (args.latencyRuns > 0) await infer(first, 1); // warm-up after the batched calls
  for (let i = 0; i < args.latencyRuns; i++) {
    const start = performance.now();
    await infer(first, 1);
    latencies.push(performance.now() - start);
  }

  process.stdout.write(
    JSON.stringify({
      shape: [n, numClasses],
      latency_ms: median(latencies),
      latencies_ms: latencies,
      agreement_pass_ms: passMs,
      format,
      input: model.input.names[0],
      output: outputName,
      batch: batchSize,
      backend: tf.getBackend(),
      tfjs: tf.version.tfjs,
    }) + '\n',
  );
}

// exitCode rather than process.exit(): exit() can cut off a pending write to a pipe.
main().catch((err) => {
  const message = String(err?.message ?? err)
    .replace(/\s+/g, ' ')
    .trim();
  process.stderr.write(`run.mjs: ${message}\n`);
  process.exitCode = err instanceof UsageError ? 2 : 1;
});
