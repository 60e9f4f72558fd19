#!/usr/bin/env node
// Runs a TF.js graph-model bundle on the wasm backend, the way a web app runs it.
//
//   node run.mjs --model DIR --input images.bin --shape N,H,W,3 --output probs.bin \
//                [--output-key probabilities] [--batch 16] [--latency-runs 30]
//
// The input file holds raw little-endian float32 images, read --batch images at a time (never the
// whole file at once); the output file receives raw float32 [N, C]. The agreement pass runs
// --batch images a call; then --latency-runs single-image calls are timed after a warm-up call.
// On success one JSON line goes to stdout:
//   {"shape":[N,C],"latency_ms":<median>,"latencies_ms":[...],"agreement_pass_ms":<batched pass>,
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
        'output-key': { type: 'string', default: 'probabilities' },
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
    outputKey: values['output-key'],
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

/**
 * Maps the input and the requested output key to graph node names.
 *
 * The converter names a signature output by its SavedModel key only when no other output has the
 * same dtype and shape; `probabilities` and `logits` are both [-1, C], so both end up keyed by
 * tensor name (`Identity:0`, `Identity_1:0`). Converting with `use_structured_outputs_names=True`
 * adds `userDefinedMetadata.structuredOutputKeys`, the sorted keys in signature-output order;
 * GraphModel.predict pairs them the same way.
 */
function resolveSignature(artifacts, outputKey) {
  const signature = artifacts.userDefinedMetadata?.signature ?? artifacts.signature ?? {};
  const inputs = Object.values(signature.inputs ?? {});
  const outputs = signature.outputs ?? {};
  if (inputs.length !== 1) {
    throw new Error(`expected a signature with exactly one input, the model has ${inputs.length}`);
  }
  const inputNode = inputs[0].name;
  if (outputKey in outputs) {
    return { inputNode, outputNode: outputs[outputKey].name };
  }
  const structuredKeys = artifacts.userDefinedMetadata?.structuredOutputKeys ?? [];
  const outputEntries = Object.values(outputs);
  const index = structuredKeys.indexOf(outputKey);
  if (index !== -1 && structuredKeys.length === outputEntries.length) {
    return { inputNode, outputNode: outputEntries[index].name };
  }
  const known = [...new Set([...Object.keys(outputs), ...structuredKeys])].join(', ') || 'none';
  const hint =
    structuredKeys.length === 0
      ? '; outputs of equal shape lose their names unless converted with ' +
        'use_structured_outputs_names=True'
      : '';
  throw new Error(`no signature output '${outputKey}'; the model has: ${known}${hint}`);
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
  const { inputNode, outputNode } = resolveSignature(artifacts, args.outputKey);
  const model = await tf.loadGraphModel({ load: async () => artifacts });

  const [n, h, w, c] = args.shape;
  const images = imageReader(args.inputPath, args.shape);

  // Graphs with control flow only run through executeAsync; plain feed-forward ones run through
  // the cheaper synchronous path. The warm-up call picks which one, outside the timing.
  let runAsync = false;
  async function infer(pixels, count) {
    const batch = tf.tensor4d(pixels, [count, h, w, c]);
    try {
      const feed = { [inputNode]: batch };
      const output = runAsync
        ? await model.executeAsync(feed, outputNode)
        : model.execute(feed, outputNode);
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
  try {
    await infer(first, 1);
  } catch (err) {
    if (!/executeAsync/.test(err.message)) throw err;
    runAsync = true;
    await infer(first, 1);
  }

  let numClasses = null;
  let flat = null;
  const passStart = performance.now();
  for (let start = 0; start < n; start += args.batch) {
    const count = Math.min(args.batch, n - start);
    const { values, shape } = await infer(images.read(start, count), count);
    if (shape.length !== 2 || shape[0] !== count) {
      throw new Error(`output '${args.outputKey}' has shape [${shape}], expected [${count}, C]`);
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
