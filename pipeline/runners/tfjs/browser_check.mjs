#!/usr/bin/env node
// Opens a TF.js bundle's demo page (index.html) in headless Chromium and classifies images with it.
//
//   node browser_check.mjs --bundle DIR [--chromium /usr/bin/chromium] [--screenshot PAGE.png]
//                          [--backend cpu] [--timeout-ms 60000] IMAGE...
//
// The bundle folder and the images are served on 127.0.0.1 (pages cannot fetch() from file://);
// every request that leaves that server is blocked and listed. Each image goes through the page's
// own API, `window.edgepipe.classify(url, {topK: all})`. With --screenshot, the first image is
// also chosen in the page's file picker, as a person would, and the page is captured once it has
// shown the result. On success one JSON document goes to stdout:
//   {"tfjs", "backend", "browser", "labels", "results": [{"image", "top": [{label, probability}]}],
//    "shown": [{label, probability}] | null, "blocked_requests": [...], "page_errors": [...]}
// On failure the exit status is non-zero and the last stderr line says why.

import { existsSync, readFileSync, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { extname, join, resolve, sep } from 'node:path';
import { parseArgs } from 'node:util';

import { chromium } from 'playwright-core';

import { CHROMIUM_ARGS } from './chromium_flags.mjs';

const SETUP_HINT = 'run `make browser` (it installs Debian\'s chromium)';
const CONTENT_TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.json': 'application/json',
  '.bin': 'application/octet-stream',
  '.png': 'image/png',
  '.jpg': 'image/jpeg',
  '.jpeg': 'image/jpeg',
  '.gif': 'image/gif',
  '.bmp': 'image/bmp',
  '.webp': 'image/webp',
};
const IMAGE_PREFIX = '/__images__/';

class UsageError extends Error {}

function parseCli(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        bundle: { type: 'string' },
        chromium: { type: 'string', default: '/usr/bin/chromium' },
        screenshot: { type: 'string' },
        backend: { type: 'string' },
        'timeout-ms': { type: 'string', default: '60000' },
      },
      strict: true,
    });
  } catch (err) {
    throw new UsageError(err.message);
  }
  const { values, positionals } = parsed;
  if (values.bundle === undefined) throw new UsageError('missing --bundle DIR');
  if (positionals.length === 0) throw new UsageError('no images given');
  const timeoutMs = Number(values['timeout-ms']);
  if (!Number.isInteger(timeoutMs) || timeoutMs <= 0) {
    throw new UsageError(`--timeout-ms must be a positive integer, got '${values['timeout-ms']}'`);
  }
  const bundle = resolve(values.bundle);
  for (const name of ['index.html', 'model.json', 'tf.min.js']) {
    if (!existsSync(join(bundle, name))) {
      throw new Error(
        `${bundle} has no ${name}; expected a bundle written by edgepipe's tfjs stage`,
      );
    }
  }
  const images = positionals.map((p) => resolve(p));
  for (const image of images) {
    if (!existsSync(image)) throw new Error(`no such image: ${image}`);
  }
  if (!existsSync(values.chromium)) {
    throw new Error(`Chromium not found at ${values.chromium}; ${SETUP_HINT}`);
  }
  return {
    bundle,
    images,
    chromium: values.chromium,
    screenshot: values.screenshot,
    backend: values.backend,
    timeoutMs,
  };
}

/** Serves `bundle` at / and image i at /__images__/<i><ext>, on 127.0.0.1 only. */
async function serve(bundle, images) {
  const server = createServer((request, response) => {
    let path;
    try {
      path = decodeURIComponent(new URL(request.url, 'http://localhost').pathname);
    } catch {
      path = '';
    }
    let file = null;
    if (path.startsWith(IMAGE_PREFIX)) {
      const index = Number.parseInt(path.slice(IMAGE_PREFIX.length), 10);
      file = images[index] ?? null;
    } else {
      const candidate = resolve(bundle, '.' + (path === '/' ? '/index.html' : path));
      // Nothing outside the bundle folder, whatever the URL says (`..`, encoded slashes).
      if (candidate.startsWith(bundle + sep)) file = candidate;
    }
    if (file === null || !existsSync(file) || !statSync(file).isFile()) {
      response.writeHead(404, { 'Content-Type': 'text/plain' }).end('not found');
      return;
    }
    const type = CONTENT_TYPES[extname(file).toLowerCase()] ?? 'application/octet-stream';
    response
      .writeHead(200, { 'Content-Type': type, 'Cache-Control': 'no-store' })
      .end(readFileSync(file));
  });
  await new Promise((done, fail) => {
    server.once('error', fail);
    server.listen(0, '127.0.0.1', done);
  });
  return server;
}

async function main() {
  const args = parseCli(process.argv.slice(2));
  const server = await serve(args.bundle, args.images);
  const origin = `http://127.0.0.1:${server.address().port}`;
  let browser = null;
  try {
    try {
      // launch() gives Chromium a fresh temporary profile (--user-data-dir) and removes it after.
      browser = await chromium.launch({
        executablePath: args.chromium,
        headless: true,
        args: CHROMIUM_ARGS,
        timeout: args.timeoutMs,
      });
    } catch (err) {
      const why = err.message.split('\n')[0];
      throw new Error(`Chromium at ${args.chromium} did not start (${why}); ${SETUP_HINT}`);
    }
    const page = await browser.newPage({ viewport: { width: 900, height: 620 } });
    page.setDefaultTimeout(args.timeoutMs);

    // The page must work offline: anything not served by us is blocked and reported.
    const blocked = [];
    await page.route(
      (url) => url.origin !== origin && url.protocol !== 'data:' && url.protocol !== 'blob:',
      (route) => {
        blocked.push(route.request().url());
        return route.abort();
      },
    );
    const pageErrors = [];
    page.on('pageerror', (err) => pageErrors.push(String(err.message ?? err)));

    const query = args.backend ? `?backend=${encodeURIComponent(args.backend)}` : '';
    await page.goto(`${origin}/index.html${query}`);
    const info = await page.evaluate(() => window.edgepipe.ready);

    const results = [];
    for (const [i, image] of args.images.entries()) {
      const url = `${IMAGE_PREFIX}${i}${extname(image).toLowerCase()}`;
      const top = await page.evaluate(
        ([source, topK]) => window.edgepipe.classify(source, { topK }),
        [url, info.labels.length],
      );
      results.push({ image, top });
    }

    let shown = null;
    if (args.screenshot) {
      await page.setInputFiles('#file', args.images[0]);
      await page.waitForSelector('#status[data-state="done"], #status[data-state="error"]');
      const state = await page.getAttribute('#status', 'data-state');
      if (state !== 'done') {
        throw new Error(`the page failed: ${await page.textContent('#status')}`);
      }
      shown = await page.$$eval('#results li', (items) =>
        items.map((li) => ({
          label: li.dataset.label,
          probability: Number(li.dataset.probability),
        })),
      );
      await page.screenshot({ path: args.screenshot, fullPage: true });
    }

    process.stdout.write(
      JSON.stringify({
        tfjs: info.tfjs,
        backend: info.backend,
        browser: browser.version(),
        labels: info.labels,
        results,
        shown,
        blocked_requests: blocked,
        page_errors: pageErrors,
      }) + '\n',
    );
  } finally {
    if (browser !== null) await browser.close();
    server.close();
  }
}

// exitCode rather than process.exit(): exit() can cut off a pending write to a pipe.
main().catch((err) => {
  const message = String(err?.message ?? err)
    .replace(/\s+/g, ' ')
    .trim();
  process.stderr.write(`browser_check.mjs: ${message}\n`);
  process.exitCode = err instanceof UsageError ? 2 : 1;
});
