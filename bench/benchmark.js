#!/usr/bin/env node
'use strict';
/**
 * In-process micro benchmarks: every suite in bench/micro/*.js, timed by bench/lib/runner.js.
 *
 *   node bench/benchmark.js [--suite NAME] [--filter TEXT] [--iterations N] [--warmup N] [--json]
 *
 * A suite module exports { name, suite(ctx) } where ctx = { pkg, native, log } and suite() resolves
 * { defs: [{ name, fn, ops, bytes?, iterations?, warmup? }], teardown? }. Needs `npx tsc -p .` first.
 */
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const { ROOT } = require('./lib/proc.js');
const { measure } = require('./lib/runner.js');
const { formatCount, printTable } = require('./lib/stats.js');

function parseCommandLine(argv) {
  const options = { suite: '', filter: '', iterations: undefined, warmup: undefined, json: false };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--suite') options.suite = argv[++i] ?? '';
    else if (arg === '--filter') options.filter = argv[++i] ?? '';
    else if (arg === '--iterations') options.iterations = Number(argv[++i]);
    else if (arg === '--warmup') options.warmup = Number(argv[++i]);
    else if (arg === '--json') options.json = true;
    else throw new Error(`unknown argument '${arg}'\nusage: node bench/benchmark.js [--suite NAME] [--filter TEXT] [--iterations N] [--warmup N] [--json]`);
  }
  return options;
}

/** Every suite module of bench/micro, in name order. */
function loadSuites() {
  const dir = path.join(__dirname, 'micro');
  return fs
    .readdirSync(dir)
    .filter((f) => f.endsWith('.js'))
    .sort()
    .map((f) => require(path.join(dir, f)));
}

/** Run one suite's matching benchmarks; a suite whose setup throws gives one failed row. */
async function runSuite(mod, ctx, options) {
  const wanted = (name) => `${mod.name} ${name}`.toLowerCase().includes(options.filter.toLowerCase());
  let prepared;
  try {
    prepared = await mod.suite(ctx);
  } catch (error) {
    return [{ name: `${mod.name}: setup`, error: error.message }];
  }
  const results = [];
  try {
    for (const def of prepared.defs.filter((d) => wanted(d.name))) {
      ctx.log(`${def.name} …`);
      results.push(await measure(def, { iterations: options.iterations, warmup: options.warmup }));
    }
  } finally {
    await prepared.teardown?.();
  }
  return results;
}

function resultRow(r) {
  if (r.error) return [r.name, 'FAILED', '-', '-', r.error.slice(0, 80)];
  const mbps = Number.isFinite(r.bytesPerSec) ? `${(r.bytesPerSec / 1e6).toFixed(0)} MB/s` : '';
  return [r.name, `${r.medianMs.toFixed(2)} ms`, formatCount(r.opsPerSec), mbps, ''];
}

async function main() {
  const options = parseCommandLine(process.argv.slice(2));
  const pkg = require(path.join(ROOT, 'dist', 'ts', 'index.js'));
  const { native } = require(path.join(ROOT, 'dist', 'ts', 'native.js'));
  const log = (line) => process.stderr.write(line + '\n');
  const ctx = { pkg, native, log };
  const results = [];
  for (const mod of loadSuites().filter((m) => !options.suite || m.name === options.suite)) {
    results.push(...(await runSuite(mod, ctx, options)));
  }
  if (options.json) {
    process.stdout.write(JSON.stringify(results, null, 2) + '\n');
    return;
  }
  process.stdout.write(`${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), node ${process.version}, pool threads ${native.poolThreads}\n`);
  printTable(['benchmark', 'median/iter', 'ops/s', 'throughput', 'error'], results.map(resultRow));
}

main().catch((error) => {
  process.stderr.write(`${error.stack ?? error}\n`);
  process.exitCode = 1;
});
