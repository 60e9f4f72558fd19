#!/usr/bin/env node
// Runs TF.js models in real headless Chromium on one backend (wasm, webgl, webgpu), the way a web
// page runs them: the page loads tf.min.js and the backends from node_modules and fetches the
// model over HTTP like any app.
//
//   node chromium_run.mjs [--chromium /usr/bin/chromium] [--webgpu] [--chromium-arg FLAG]...
//       Serves jobs: one JSON object per stdin line, one JSON answer per stdout line.
//   node chromium_run.mjs --probe [--chromium ...]
//       Says which backends this Chromium offers headless, as one JSON line, and exits.
//
// A job is {"model": DIR, "input": images.bin, "shape": [N,H,W,3], "output": probs.bin,
// "backend": "wasm"|"webgl"|"webgpu", "f16": bool, "input_name", "output_key", "batch",
// "latency_runs", "timeout_ms"}: the same work as run.mjs (a warm-up call, the agreement pass
// `batch` images a call into `output` as raw float32 [N, C], then `latency_runs` timed single-image
// calls after a warm-up) in a fresh browser context of one Chromium kept for all jobs. Its answer
// is run.mjs's summary plus what the page ran on (`backend` as tf.getBackend() says, `flags`,
// `renderer`/`adapter`, `browser`), or {"error": "..."}; the process lives on after an error.
//
// The images never travel as JSON: the page fetches `batch` images at a time from this script's
// server on 127.0.0.1 (raw little-endian float32, as FeedFile writes them) and posts the outputs
// back the same way. Every request that leaves that server is blocked and listed.
//
// The page code (PAGE_SCRIPT) repeats run.mjs's choice of input and output so both runners pick
// the same tensors and say the same things about wrong names; keep the two in step.

import { randomUUID } from 'node:crypto';
import {
  closeSync, existsSync, openSync, readFileSync, readSync, realpathSync, statSync, writeFileSync,
} from 'node:fs';
import { createServer } from 'node:http';
import { dirname, join, resolve, sep } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { chromium } from 'playwright-core';

import { CHROMIUM_ARGS } from './chromium_flags.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const TFJS = join(HERE, 'node_modules', '@tensorflow');
const WASM_DIST = join(TFJS, 'tfjs-backend-wasm', 'dist');
// Not a dependency of ours (not in package-lock.json): used when present, reported when not.
const WEBGPU_SCRIPT = join(TFJS, 'tfjs-backend-webgpu', 'dist', 'tf-backend-webgpu.min.js');
const LIBRARIES = {
  '/lib/tf.min.js': join(TFJS, 'tfjs', 'dist', 'tf.min.js'),
  '/lib/tf-backend-wasm.min.js': join(WASM_DIST, 'tf-backend-wasm.min.js'),
  '/lib/tf-backend-webgpu.min.js': WEBGPU_SCRIPT,
};
for (const flavour of ['', '-simd', '-threaded-simd']) {
  const name = `tfjs-backend-wasm${flavour}.wasm`;
  LIBRARIES[`/lib/wasm/${name}`] = join(WASM_DIST, name);
}
const TFJS_VERSION = JSON.parse(readFileSync(join(TFJS, 'tfjs', 'package.json'), 'utf8')).version;
const SETUP_HINT = 'run `make browser` (it installs Debian\'s chromium) and `make setup`';
// Headless Chromium on Linux offers no WebGPU adapter without it (measured on Chromium 156:
// "No available adapters"; with it, SwiftShader's).
const WEBGPU_ARGS = ['--enable-unsafe-webgpu'];
const CONTENT_TYPES = { '.js': 'text/javascript; charset=utf-8', '.wasm': 'application/wasm' };

class UsageError extends Error {}

function parseCli(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        chromium: { type: 'string', default: '/usr/bin/chromium' },
        probe: { type: 'boolean', default: false },
        webgpu: { type: 'boolean', default: false },
        'chromium-arg': { type: 'string', multiple: true, default: [] },
      },
      strict: true,
    }));
  } catch (err) {
    throw new UsageError(err.message);
  }
  if (!existsSync(values.chromium)) {
    throw new Error(`Chromium not found at ${values.chromium}; ${SETUP_HINT}`);
  }
  const webgpu = values.webgpu || values.probe ? WEBGPU_ARGS : [];
  const args = [...CHROMIUM_ARGS, ...webgpu, ...values['chromium-arg']];
  return { chromium: values.chromium, probe: values.probe, args };
}

/*
 * The page's side, sent as the text of this function (it sees nothing of this module): defines
 * window.edgepipeRunner = {probe(options), run(job)} on top of the `tf` global.
 */
function PAGE_SCRIPT() {
  const DEFAULT_OUTPUT = 'probabilities';
  const TF_DTYPES = { DT_FLOAT: 'float32', DT_INT32: 'int32', DT_BOOL: 'bool', DT_STRING: 'string' };
  const BYTES_PER_ELEMENT = { float32: 4, int32: 4, bool: 1, complex64: 8, uint8: 1, uint16: 2, float16: 2 };
  const WEBGL_FLAGS = [
    'WEBGL_VERSION', 'WEBGL_FORCE_F16_TEXTURES', 'WEBGL_RENDER_FLOAT32_CAPABLE', 'WEBGL_RENDER_FLOAT32_ENABLED',
    'WEBGL_DOWNLOAD_FLOAT_ENABLED', 'WEBGL_PACK',
  ];
  const WASM_FLAGS = ['WASM_HAS_SIMD_SUPPORT', 'WASM_HAS_MULTITHREAD_SUPPORT'];

  async function webgpuAdapter() {
    if (!navigator.gpu) return { adapter: null, why: 'navigator.gpu is undefined' };
    try {
      const adapter = await navigator.gpu.requestAdapter();
      if (adapter === null) return { adapter: null, why: 'navigator.gpu.requestAdapter() gave no adapter' };
      const info = adapter.info ?? {};
      const words = [info.vendor, info.architecture, info.description].filter(Boolean);
      return { adapter: words.join(' ') || 'unnamed' };
    } catch (err) {
      return { adapter: null, why: `navigator.gpu.requestAdapter() failed: ${err.message}` };
    }
  }

  /** The WebGL renderer string tfjs's own context reports (ANGLE's, naming SwiftShader or a GPU). */
  function webglRenderer() {
    const gl = tf.backend()?.gpgpu?.gl;
    if (!gl) return null;
    const ext = gl.getExtension('WEBGL_debug_renderer_info');
    return gl.getParameter(ext ? ext.UNMASKED_RENDERER_WEBGL : gl.RENDERER);
  }

  /**
   * Switches tfjs to `backend` (webgl with WEBGL_FORCE_F16_TEXTURES = `f16`) and checks that it is
   * the one running: tfjs falls back to the next backend with only a console warning.
   * Returns {backend, flags, renderer | adapter}.
   */
  async function useBackend(backend, f16) {
    const warnings = [];
    const warn = console.warn;
    console.warn = (...items) => {
      warnings.push(items.map((item) => String(item?.message ?? item).split('\n')[0]).join(' '));
      warn(...items);
    };
    try {
      if (backend === 'webgpu' && tf.findBackendFactory('webgpu') === null) {
        const { adapter, why } = await webgpuAdapter();
        const offered = adapter
          ? `Chromium offers a WebGPU adapter (${adapter})`
          : `Chromium offers no WebGPU adapter (${why})`;
        throw new Error(
          'TF.js has no webgpu backend here: @tensorflow/tfjs-backend-webgpu is not installed in ' +
            `pipeline/runners/tfjs/node_modules (it is not in package-lock.json); ${offered}`,
        );
      }
      if (backend === 'webgl') tf.env().set('WEBGL_FORCE_F16_TEXTURES', f16);
      let started = false;
      try {
        started = await tf.setBackend(backend);
        await tf.ready();
      } catch (err) {
        warnings.push(String(err.message ?? err).split('\n')[0]);
      }
      const running = tf.getBackend();
      // The first reasons, once each: a fallback repeats them and adds its own.
      const why = [...new Set(warnings.filter((w) => !/^Initialization of backend/.test(w)))]
        .slice(0, 2).map((w) => w.replace(/^Error: /, '').slice(0, 200)).join('; ');
      if (!started || running !== backend) {
        const fell = running && running !== backend
          ? `asked for ${backend}, TF.js runs ${running}`
          : `the ${backend} backend did not start`;
        throw new Error(`${fell}${why ? ` (${why})` : ''}`);
      }
    } finally {
      console.warn = warn;
    }
    const flags = {};
    for (const name of backend === 'webgl' ? WEBGL_FLAGS : backend === 'wasm' ? WASM_FLAGS : []) {
      flags[name] = await tf.env().getAsync(name);
    }
    const out = { backend: tf.getBackend(), flags };
    if (backend === 'webgl') {
      out.renderer = webglRenderer();
      if (f16 && !flags.WEBGL_FORCE_F16_TEXTURES) {
        throw new Error('asked for f16 textures, tfjs did not take WEBGL_FORCE_F16_TEXTURES');
      }
      // float32 textures were asked for: a WebGL without them would quietly compute in f16.
      if (!f16 && !flags.WEBGL_RENDER_FLOAT32_ENABLED) {
        throw new Error(`asked for float32 WebGL textures, this WebGL (${out.renderer}) renders only f16`);
      }
    }
    if (backend === 'webgpu') out.adapter = (await webgpuAdapter()).adapter;
    return out;
  }

  async function fetchOk(url, what, init) {
    const response = await fetch(url, init);
    if (!response.ok) throw new Error(`cannot read ${what}: HTTP ${response.status} ${await response.text()}`);
    return response;
  }

  function weightByteLength(spec) {
    const bytes = BYTES_PER_ELEMENT[spec.quantization?.dtype ?? spec.dtype];
    return bytes === undefined ? null : spec.shape.reduce((a, b) => a * b, 1) * bytes;
  }

  /** model.json and its shards, fetched as an app fetches them, every shard's size checked. */
  async function loadArtifacts(base, modelDir) {
    let modelJson;
    const text = await (await fetchOk(`${base}model.json`, `${modelDir}/model.json`)).text();
    try {
      modelJson = JSON.parse(text);
    } catch (err) {
      throw new Error(`${modelDir}/model.json is not valid JSON (${err.message})`);
    }
    if (modelJson.modelTopology == null || !Array.isArray(modelJson.weightsManifest)) {
      throw new Error(`${modelDir}/model.json has no modelTopology/weightsManifest; is it a TF.js model?`);
    }
    return tf.io.getModelArtifactsForJSON(modelJson, async (manifest) => {
      const specs = [];
      const buffers = [];
      for (const group of manifest) {
        specs.push(...group.weights);
        for (const shard of group.paths) {
          const response = await fetchOk(`${base}${shard}`, `weight shard ${modelDir}/${shard}`);
          buffers.push(await response.arrayBuffer());
        }
      }
      const weightData = tf.io.concatenateArrayBuffers(buffers);
      const sizes = specs.map(weightByteLength);
      const expected = sizes.includes(null) ? null : sizes.reduce((a, b) => a + b, 0);
      if (expected !== null && weightData.byteLength !== expected) {
        throw new Error(
          `weight shards in ${modelDir} hold ${weightData.byteLength} bytes but model.json ` +
            `describes ${expected}; the bundle is truncated or mixed from two conversions`,
        );
      }
      return [specs, weightData];
    });
  }

  // From here to openLayersModel: run.mjs's choice of tensors (see its comments), unchanged.
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

  function graphTensors(artifacts, model) {
    const signature = artifacts.userDefinedMetadata?.signature ?? artifacts.signature ?? {};
    const named = (entries) => entries.length > 0 && entries.every(([, info]) => typeof info?.name === 'string');
    const inputEntries = Object.entries(signature.inputs ?? {});
    const outputEntries = Object.entries(signature.outputs ?? {});
    const fromSignature = ([key, info]) => ({
      names: [...new Set([key, info.name, info.name.replace(/:0$/, '')])],
      node: info.name,
      shape: signatureShape(info),
      dtype: signatureDtype(info),
    });
    const inputs = named(inputEntries) ? inputEntries.map(fromSignature) : model.inputs.map(fromNodeInfo);
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
      node(name) {
        if (!nodeNames.has(name.replace(/:\d+$/, ''))) return null;
        return { names: [name], node: name, shape: null, dtype: null };
      },
      hint: lostNames
        ? ' (outputs of equal shape lose their names unless converted with use_structured_outputs_names=True)'
        : '',
    };
  }

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

  function checkImageInput(input, [, h, w, c], batch) {
    const name = input.names[0];
    if (input.dtype !== null && input.dtype !== 'float32') {
      throw new Error(`input '${name}' is ${input.dtype}; the runner feeds float32 images`);
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
    throw new Error(`input '${name}' has a fixed batch of ${shape[0]} (${shown}); the runner needs 1 or any`);
  }

  async function openGraphModel(artifacts, job) {
    const model = await tf.loadGraphModel({ load: async () => artifacts });
    const tensors = graphTensors(artifacts, model);
    const input = pick(tensors.inputs, job.input_name, { kind: 'input', flag: '--input', node: tensors.node });
    const output = pick(tensors.outputs, job.output_key, {
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
      dispose: () => model.dispose(),
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

  async function openLayersModel(artifacts, job) {
    const model = await tf.loadLayersModel({ load: async () => artifacts });
    const described = (symbolic, i) => ({
      names: [...new Set([symbolic.sourceLayer.name, symbolic.name])],
      index: i,
      shape: symbolic.shape,
      dtype: symbolic.dtype ?? null,
    });
    const inputs = model.inputs.map(described);
    const outputs = model.outputs.map(described);
    if (inputs.length > 1) {
      const list = inputs.map((c) => c.names[0]).join(', ');
      throw new Error(
        `the layers model has ${inputs.length} inputs (${list}); the runner feeds one image input`,
      );
    }
    const input = pick(inputs, job.input_name, { kind: 'input', flag: '--input' });
    const output = pick(outputs, job.output_key, {
      kind: 'output',
      flag: '--output',
      preferred: DEFAULT_OUTPUT,
    });
    return {
      input,
      output,
      dispose: () => model.dispose(),
      async infer(batch) {
        const result = model.predict(batch, { batchSize: batch.shape[0] });
        const all = Array.isArray(result) ? result : [result];
        all.forEach((t, i) => i !== output.index && t.dispose());
        return all[output.index];
      },
    };
  }

  const OPENERS = { 'graph-model': openGraphModel, 'layers-model': openLayersModel };

  function modelFormat(artifacts, modelDir) {
    const guessed = Array.isArray(artifacts.modelTopology?.node) ? 'graph-model' : 'layers-model';
    const format = artifacts.format ?? guessed;
    if (!(format in OPENERS)) {
      throw new Error(`${modelDir}/model.json has format '${format}'; expected graph-model or layers-model`);
    }
    return format;
  }

  function median(values) {
    if (values.length === 0) return null;
    const sorted = [...values].sort((a, b) => a - b);
    const mid = Math.floor(sorted.length / 2);
    return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  }

  // The backend this page started, once: tfjs reads WEBGL_FORCE_F16_TEXTURES when it starts webgl.
  let started = null;

  async function start(backend, f16) {
    if (started === null) {
      const t0 = performance.now();
      const ran = await useBackend(backend, f16);
      started = { backend, f16, ran, ms: performance.now() - t0, fresh: true };
    } else if (started.backend !== backend || started.f16 !== f16) {
      throw new Error(`this page runs ${started.backend}${started.f16 ? ' (f16)' : ''}, not ${backend}`);
    }
    const fresh = started.fresh;
    started.fresh = false;
    return { ...started.ran, backend: tf.getBackend(), backend_ms: fresh ? started.ms : null };
  }

  async function run(job) {
    const ran = await start(job.backend, job.f16);
    const tensorsBefore = tf.memory().numTensors;
    const t0 = performance.now();
    const artifacts = await loadArtifacts(`/jobs/${job.token}/model/`, job.model);
    const format = modelFormat(artifacts, job.model);
    const model = await OPENERS[format](artifacts, job);
    let result;
    try {
      const loadMs = performance.now() - t0;
      result = { ...(await runModel(model, job)), format, ...ran, load_ms: loadMs };
    } finally {
      model.dispose();
    }
    // What the next job would inherit; chromium_run.mjs opens a new page when it is not 0.
    result.tensors_left = tf.memory().numTensors - tensorsBefore;
    return result;
  }

  async function runModel(model, job) {
    const batchSize = checkImageInput(model.input, job.shape, job.batch);
    const outputName = model.output.names[0];
    const [n, h, w, c] = job.shape;
    const perImage = h * w * c;
    async function read(start, count) {
      const url = `/jobs/${job.token}/feed?start=${start}&count=${count}`;
      const response = await fetchOk(url, `images ${start}..${start + count - 1}`);
      const pixels = new Float32Array(await response.arrayBuffer());
      if (pixels.length !== count * perImage) {
        throw new Error(`the feed sent ${pixels.length} floats for ${count} images`);
      }
      return pixels;
    }
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

    const first = await read(0, 1);
    await infer(first, 1);
    let numClasses = null;
    let flat = null;
    const passStart = performance.now();
    for (let start = 0; start < n; start += batchSize) {
      const count = Math.min(batchSize, n - start);
      const { values, shape } = await infer(await read(start, count), count);
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
    await fetchOk(`/jobs/${job.token}/outputs`, 'the outputs back', { method: 'POST', body: flat });

    const latencies = [];
    if (job.latency_runs > 0) await infer(first, 1); // warm-up after the batched calls
    for (let i = 0; i < job.latency_runs; i++) {
      const start = performance.now();
      await infer(first, 1);
      latencies.push(performance.now() - start);
    }
    return {
      shape: [n, numClasses],
      latency_ms: median(latencies),
      latencies_ms: latencies,
      agreement_pass_ms: passMs,
      input: model.input.names[0],
      output: outputName,
      batch: batchSize,
      tfjs: tf.version.tfjs,
    };
  }

  /** {name: [backend, f16]}, tried in turn: {name: {ok, backend, flags, renderer | adapter} or {ok, reason}}. */
  async function probe(tries) {
    const found = {};
    for (const [name, [backend, f16]] of Object.entries(tries)) {
      try {
        found[name] = { ok: true, ...(await useBackend(backend, f16)) };
      } catch (err) {
        found[name] = { ok: false, reason: err.message };
      }
    }
    return found;
  }

  // Always: tfjs falls back to wasm when the backend asked for fails, and should say so cleanly.
  tf.wasm.setWasmPaths(new URL('/lib/wasm/', location.href).href);
  window.edgepipeRunner = { probe, run };
}

function pageHtml() {
  const webgpu = existsSync(WEBGPU_SCRIPT) ? '<script src="/lib/tf-backend-webgpu.min.js"></script>' : '';
  return (
    '<!doctype html><meta charset="utf-8"><title>edgepipe chromium runner</title><link rel="icon" href="data:,">' +
    `<script src="/lib/tf.min.js"></script><script src="/lib/tf-backend-wasm.min.js"></script>${webgpu}` +
    '<script src="/runner.js"></script>'
  );
}

function fail(response, status, message) {
  response.writeHead(status, { 'Content-Type': 'text/plain' }).end(message);
}

/**
 * The page, the libraries and, under /jobs/<token>/, each running job's model folder, feed slices
 * (?start=&count=) and outputs (POST); on 127.0.0.1 only.
 */
async function serve(jobs) {
  const runner = `(${PAGE_SCRIPT})();\n`;
  const server = createServer((request, response) => {
    let url;
    let path;
    try {
      url = new URL(request.url, 'http://localhost');
      path = decodeURIComponent(url.pathname);
    } catch {
      return fail(response, 400, 'bad URL');
    }
    const headers = { 'Cache-Control': 'no-store' };
    if (path === '/') {
      return response.writeHead(200, { ...headers, 'Content-Type': 'text/html; charset=utf-8' }).end(pageHtml());
    }
    if (path === '/runner.js') {
      return response.writeHead(200, { ...headers, 'Content-Type': CONTENT_TYPES['.js'] }).end(runner);
    }
    if (path in LIBRARIES && existsSync(LIBRARIES[path])) {
      const type = CONTENT_TYPES[path.slice(path.lastIndexOf('.'))];
      return response.writeHead(200, { ...headers, 'Content-Type': type }).end(readFileSync(LIBRARIES[path]));
    }
    const match = /^\/jobs\/([^/]+)\/(model\/.+|feed|outputs)$/.exec(path);
    const job = match ? jobs.get(match[1]) : undefined;
    if (job === undefined) return fail(response, 404, 'not found');
    const [, , what] = match;
    if (what === 'feed') return sendFeed(job, url.searchParams, response, headers);
    if (what === 'outputs') return receiveOutputs(job, request, response);
    const file = resolve(job.modelDir, '.' + what.slice('model'.length));
    // Nothing outside the model folder, whatever the URL says (`..`, encoded slashes).
    if (!file.startsWith(job.modelDir + sep) || !existsSync(file) || !statSync(file).isFile()) {
      return fail(response, 404, `no ${what.slice('model/'.length)} in the model folder`);
    }
    response.writeHead(200, { ...headers, 'Content-Type': 'application/octet-stream' }).end(readFileSync(file));
  });
  await new Promise((done, failed) => {
    server.once('error', failed);
    server.listen(0, '127.0.0.1', done);
  });
  return server;
}

function sendFeed(job, params, response, headers) {
  const start = Number(params.get('start'));
  const count = Number(params.get('count'));
  const n = job.shape[0];
  if (!Number.isInteger(start) || !Number.isInteger(count) || start < 0 || count < 1 || start + count > n) {
    return fail(response, 400, `images ${params.get('start')}+${params.get('count')} are not in 0..${n - 1}`);
  }
  const perImage = job.shape[1] * job.shape[2] * job.shape[3] * 4;
  const bytes = Buffer.alloc(count * perImage);
  const fd = openSync(job.input, 'r');
  try {
    readSync(fd, bytes, 0, bytes.length, start * perImage);
  } finally {
    closeSync(fd);
  }
  response.writeHead(200, { ...headers, 'Content-Type': 'application/octet-stream' }).end(bytes);
}

function receiveOutputs(job, request, response) {
  if (request.method !== 'POST') return fail(response, 405, 'POST the outputs');
  const chunks = [];
  request.on('data', (chunk) => chunks.push(chunk));
  request.on('end', () => {
    writeFileSync(job.output, Buffer.concat(chunks));
    response.writeHead(204).end();
  });
}

/** Checks a job's fields and files before Chromium sees it. */
function checkJob(job) {
  const shape = job.shape;
  const dims = Array.isArray(shape) && shape.length === 4 && shape.every((d) => Number.isInteger(d) && d > 0);
  if (!dims || shape[3] !== 3) {
    throw new UsageError(`shape must be [N,H,W,3] with positive integers, got ${JSON.stringify(shape)}`);
  }
  if (!['wasm', 'webgl', 'webgpu'].includes(job.backend)) {
    throw new UsageError(`backend must be wasm, webgl or webgpu, got ${JSON.stringify(job.backend)}`);
  }
  const batchOk = Number.isInteger(job.batch) && job.batch >= 1;
  if (!batchOk || !Number.isInteger(job.latency_runs) || job.latency_runs < 0) {
    throw new UsageError(`batch must be >= 1 and latency_runs >= 0, got ${job.batch}, ${job.latency_runs}`);
  }
  if (!existsSync(join(job.model, 'model.json'))) {
    throw new Error(`${job.model} has no model.json; expected a TF.js graph- or layers-model folder`);
  }
  const expected = shape.reduce((a, b) => a * b, 1) * 4;
  const size = existsSync(job.input) ? statSync(job.input).size : -1;
  if (size < expected) {
    const what = size < 0 ? 'missing' : 'shorter than';
    throw new Error(`input ${job.input} is ${what} float32 of shape ${shape.join('x')} (${expected} bytes)`);
  }
}

/** Playwright's "page.evaluate: Error: <message>\n    at ..." as the message alone. */
function pageMessage(err) {
  const first = String(err?.message ?? err).split('\n')[0];
  return first.replace(/^[\w.]+: (Error: )?/, '');
}

/**
 * One Chromium for every job, launched on the first and again after a crash, and one page on it
 * kept from job to job (tfjs loaded and its backend started once: a new page costs 0.7 to 1.2 s,
 * measured). The page is replaced after a job that failed or left tensors behind.
 */
class Browser {
  constructor(options, origin) {
    this.options = options;
    this.origin = origin;
    this.browser = null;
    this.context = null;
    this.page = null;
    this.launches = 0;
    this.pages = 0;
    this.blocked = [];
    this.pageErrors = [];
  }

  async launch() {
    if (this.browser !== null && this.browser.isConnected()) return null;
    this.context = null;
    this.page = null;
    const start = performance.now();
    try {
      // launch() gives Chromium a fresh temporary profile (--user-data-dir) and removes it after.
      this.browser = await chromium.launch({
        executablePath: this.options.chromium,
        headless: true,
        args: this.options.args,
      });
    } catch (err) {
      this.browser = null;
      const why = err.message.split('\n')[0];
      throw new Error(`Chromium at ${this.options.chromium} did not start (${why}); ${SETUP_HINT}`);
    }
    this.launches += 1;
    return performance.now() - start;
  }

  /** A runner page in a context of its own: nothing leaves 127.0.0.1 (blocked and listed). */
  async newPage(timeoutMs) {
    const context = await this.browser.newContext();
    const page = await context.newPage();
    await page.route(
      (url) => url.origin !== this.origin && url.protocol !== 'data:' && url.protocol !== 'blob:',
      (route) => {
        this.blocked.push(route.request().url());
        return route.abort();
      },
    );
    page.on('pageerror', (err) => this.pageErrors.push(String(err.message ?? err)));
    page.setDefaultTimeout(timeoutMs);
    await page.goto(`${this.origin}/`);
    this.pages += 1;
    return { context, page };
  }

  /** The page kept for jobs, opened where there is none; the milliseconds that took, or null. */
  async open(timeoutMs) {
    if (this.page !== null && !this.page.isClosed()) return null;
    const start = performance.now();
    ({ context: this.context, page: this.page } = await this.newPage(timeoutMs));
    return performance.now() - start;
  }

  /** Which backends start: PROBES, its pages at once. */
  async probe(timeoutMs) {
    const launchMs = await this.launch();
    const found = await Promise.all(PROBES.map(async (tries) => {
      const { context, page } = await this.newPage(timeoutMs);
      try {
        return await page.evaluate((t) => window.edgepipeRunner.probe(t), tries);
      } finally {
        await context.close();
      }
    }));
    const backends = Object.assign({}, ...found);
    return { browser: this.browser.version(), tfjs: TFJS_VERSION, launch_ms: launchMs, backends,
             blocked_requests: this.blocked, page_errors: this.pageErrors };
  }

  async recycle() {
    const context = this.context;
    this.context = null;
    this.page = null;
    if (context !== null) await context.close().catch(() => {});
  }

  /** Runs `work(page)`; `timeoutMs` bounds it, Chromium's start and the page's included. */
  async job(timeoutMs, work) {
    this.blocked = [];
    this.pageErrors = [];
    let timer;
    const timeout = new Promise((_, reject) => {
      const message = `timed out after ${timeoutMs / 1000} s in Chromium`;
      timer = setTimeout(() => reject(new Error(message)), timeoutMs);
    });
    try {
      const ran = (async () => {
        const launchMs = await this.launch();
        const pageMs = await this.open(timeoutMs);
        return { ...(await work(this.page)), launch_ms: launchMs, page_ms: pageMs };
      })();
      ran.catch(() => {}); // after a timeout its rejection (the page closed under it) is nobody's
      const result = await Promise.race([ran, timeout]);
      if (result.tensors_left) await this.recycle();
      return {
        ...result,
        browser: this.browser.version(),
        launches: this.launches,
        pages: this.pages,
        blocked_requests: this.blocked,
        page_errors: this.pageErrors,
      };
    } catch (err) {
      await this.recycle();
      const extra = this.pageErrors.length ? ` (page errors: ${this.pageErrors.slice(0, 3).join('; ')})` : '';
      throw new Error(`${pageMessage(err)}${extra}`);
    } finally {
      clearTimeout(timer);
    }
  }

  async close() {
    if (this.browser !== null) await this.browser.close().catch(() => {});
  }
}

// The probe's pages and what each tries in turn (tfjs switches backends in a page, but reads
// WEBGL_FORCE_F16_TEXTURES once, when it first starts webgl).
const PROBES = [
  { wasm: ['wasm', false], webgl: ['webgl', false], webgpu: ['webgpu', false] },
  { 'webgl-f16': ['webgl', true] },
];

async function main() {
  const options = parseCli(process.argv.slice(2));
  const jobs = new Map();
  const server = await serve(jobs);
  const browser = new Browser(options, `http://127.0.0.1:${server.address().port}`);
  try {
    if (options.probe) {
      process.stdout.write(JSON.stringify(await browser.probe(60000)) + '\n');
      return;
    }
    // Jobs one at a time, each answered on one line; an error is an answer, not the end.
    for await (const line of createInterface({ input: process.stdin })) {
      if (!line.trim()) continue;
      let answer;
      try {
        const job = JSON.parse(line);
        checkJob(job);
        const token = randomUUID();
        jobs.set(token, { ...job, modelDir: realpathSync(resolve(job.model)) });
        try {
          answer = await browser.job(job.timeout_ms ?? 600000, (page) =>
            page.evaluate((j) => window.edgepipeRunner.run(j), { ...job, token }));
        } finally {
          jobs.delete(token);
        }
      } catch (err) {
        answer = { error: String(err?.message ?? err).replace(/\s+/g, ' ').trim() };
      }
      process.stdout.write(JSON.stringify(answer) + '\n');
    }
  } finally {
    await browser.close();
    server.close();
  }
}

// exitCode rather than process.exit(): exit() can cut off a pending write to a pipe.
main().catch((err) => {
  const message = String(err?.message ?? err).replace(/\s+/g, ' ').trim();
  process.stderr.write(`chromium_run.mjs: ${message}\n`);
  process.exitCode = err instanceof UsageError ? 2 : 1;
});
