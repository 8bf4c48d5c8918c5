#!/usr/bin/env node
'use strict';
/**
 * The disk's own limit, measured with fio (O_DIRECT, libaio): 1 MiB sequential read and write and
 * 4 KiB / 64 KiB random read, at depth 16, on a file in BENCH_DIR/fio.
 *
 *   node bench/fio.js [--size 4G] [--runtime 10] [--clean]
 */
const fs = require('node:fs');

const { benchPath } = require('./lib/benchdir.js');
const { STANDARD_JOBS, runFioJob } = require('./lib/fio.js');
const { formatCount, printTable } = require('./lib/stats.js');

function parseCommandLine(argv) {
  const options = { size: '4G', runtime: 10, clean: false };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--size') options.size = argv[++i];
    else if (arg === '--runtime') options.runtime = Number(argv[++i]);
    else if (arg === '--clean') options.clean = true;
    else throw new Error(`unknown argument '${arg}'\nusage: node bench/fio.js [--size 4G] [--runtime SECONDS] [--clean]`);
  }
  if (!Number.isSafeInteger(options.runtime) || options.runtime <= 0) throw new Error(`--runtime needs a positive integer, got ${options.runtime}`);
  return options;
}

/** Run the standard fio jobs on `file`; the write job runs first so the read jobs find data. */
async function runStandardJobs(file, options, log = () => {}) {
  const results = [];
  const order = [...STANDARD_JOBS].sort((a, b) => Number(b.rw === 'write') - Number(a.rw === 'write'));
  for (const job of order) {
    log(`fio ${job.name} …`);
    results.push(await runFioJob(job, file, options));
  }
  return STANDARD_JOBS.map((job) => results.find((r) => r.name === job.name));
}

/** The results as table rows. */
function fioRows(results) {
  return results.map((r) => [r.name, `${r.mbps.toFixed(0)} MB/s`, formatCount(r.iops), `${r.latUsMean.toFixed(0)} µs`]);
}

async function main() {
  const options = parseCommandLine(process.argv.slice(2));
  const file = benchPath('fio', 'fio-test.dat');
  const results = await runStandardJobs(file, options, (l) => process.stderr.write(l + '\n'));
  printTable(['fio job (libaio, O_DIRECT, depth 16)', 'bandwidth', 'IOPS', 'mean latency'], fioRows(results));
  process.stdout.write(`file: ${file} (${options.size}), runtime ${options.runtime} s per job\n`);
  process.stdout.write(`e.g.: ${results[2].command}\n`);
  if (options.clean) fs.rmSync(file, { force: true });
}

if (require.main === module) {
  main().catch((error) => {
    process.stderr.write(`${error.stack ?? error}\n`);
    process.exitCode = 1;
  });
}

module.exports = { runStandardJobs, fioRows };
