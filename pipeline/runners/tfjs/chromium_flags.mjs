// Chromium launch flags shared by browser_check.mjs (the demo-page tests) and chromium_run.mjs (the
// verify runtimes), so both see the same WebGL: no sandbox (containers), and none of Chromium's
// background services (component updates, sync, field trials, QUIC probes), which would try to
// connect out and be refused. --disable-gpu leaves WebGL to SwiftShader either way.
export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
