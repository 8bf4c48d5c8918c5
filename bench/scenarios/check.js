#!/usr/bin/env node
'use strict';
/**
 * `check` of the 64 GiB aged image (10 % of its 64 KiB clusters allocated in shuffled order): ours
 * against `qemu-img check -T none`, side by side, alternating.
 *
 *   node bench/scenarios/check.js [--runs N] [--small] [--drop-caches]
 *
 * Two figures for our side: the CLI (`qcow2 check -T none`, Node's start-up included) and the
 * library call (`check()` timed inside a running Node process, what a service using the package
 * pays). Both are compared with qemu-img's whole run. The outputs must be identical.
 */
const path = require('node:path');

const { compareCommands } = require('../lib/compare.js');
const { GiB, agedQcow2 } = require('../lib/fixtures.js');
const { CLI, ROOT, dropCaches, runMeasured } = require('../lib/proc.js');
const { formatMs, formatRatio, median, printTable } = require('../lib/stats.js');

const USAGE = 'usage: node bench/scenarios/check.js [--runs N] [--small] [--drop-caches]';
const log = (line) => process.stderr.write(`${line}\n`);

function parseCommandLine(argv) {
  const options = { runs: 7, small: false, dropCaches: false };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--runs') options.runs = Number(argv[++i]);
    else if (arg === '--small') options.small = true;
    else if (arg === '--drop-caches') options.dropCaches = true;
    else if (arg === '-h' || arg === '--help') return null;
    else throw new Error(`unknown argument '${arg}'\n${USAGE}`);
  }
  if (!Number.isSafeInteger(options.runs) || options.runs <= 0) throw new Error(`--runs needs a positive integer, got ${options.runs}`);
  return options;
}

/** A Node process that loads the library, then prints how long one check() of `image` took (ms). */
function libraryCommand(image) {
  const lib = path.join(ROOT, 'dist', 'ts', 'tools', 'check.js');
  const script =
    `const { check } = require(${JSON.stringify(lib)});` +
    `const t = process.hrtime.bigint();` +
    `check(${JSON.stringify(image)}, { cache: 'none' }).then((r) => {` +
    `  if (r.corruptions || r.leaks || r.checkErrors) throw new Error('check found problems: ' + JSON.stringify(r));` +
    `  console.log(Number(process.hrtime.bigint() - t) / 1e6);` +
    `});`;
  return [process.execPath, '-e', script];
}

/** Library call times, alternating with qemu-img runs. */
async function libraryTimes(image, runs, options) {
  const ours = [];
  const theirs = [];
  for (let round = 0; round < runs; round++) {
    for (const side of round % 2 === 0 ? ['ours', 'theirs'] : ['theirs', 'ours']) {
      if (options.dropCaches) dropCaches();
      if (side === 'ours') {
        const r = await runMeasured(libraryCommand(image), { stdout: 'capture' });
        if (r.code !== 0) throw new Error(`library check failed: ${r.stderr}`);
        ours.push(Number(r.stdout.trim()));
      } else {
        const r = await runMeasured(['qemu-img', 'check', '-T', 'none', image]);
        if (r.code !== 0) throw new Error(`qemu-img check failed: ${r.stderr}`);
        theirs.push(r.wallMs);
      }
    }
  }
  return { ours: median(ours), theirs: median(theirs) };
}

async function main() {
  const options = parseCommandLine(process.argv.slice(2));
  if (!options) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  const size = options.small ? 4 * GiB : 64 * GiB;
  const image = await agedQcow2(size, 0.1, log);
  const outputs = { ours: `${image}.check-ours.txt`, theirs: `${image}.check-qemu.txt` };
  const cli = await compareCommands([process.execPath, CLI, 'check', '-T', 'none', image], ['qemu-img', 'check', '-T', 'none', image], {
    runs: options.runs,
    dropCaches: options.dropCaches,
    stdout: outputs,
    log,
  });
  const same = require('node:fs').readFileSync(outputs.ours, 'utf8') === require('node:fs').readFileSync(outputs.theirs, 'utf8');
  const library = await libraryTimes(image, options.runs, options);
  const rows = [
    ['qcow2 check -T none (CLI)', formatMs(cli.ours.medianMs), formatMs(cli.theirs.medianMs), formatRatio(cli.ratio)],
    ['check() library call', formatMs(library.ours), formatMs(library.theirs), formatRatio(library.ours / library.theirs)],
  ];
  process.stdout.write(`check of ${size / GiB} GiB aged qcow2 (10 % of 64 KiB clusters), median of ${options.runs} runs\n`);
  printTable(['', 'ours', 'qemu-img check -T none', 'ratio'], rows);
  process.stdout.write(`outputs identical: ${same ? 'yes' : 'NO'}\n`);
  if (!same) process.exitCode = 1;
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exitCode = 1;
});
