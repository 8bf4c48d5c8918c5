#!/usr/bin/env node
'use strict';
/**
 * Issue 4's convert-to-qcow2 targets: `qcow2 convert -O qcow2` against `qemu-img convert -O qcow2`
 * from raw sources, side by side, alternating, cache mode none on both sides (`-t none -T none`).
 *
 *   node bench/scenarios/write-path.js [--runs N] [--only ID,ID] [--small] [--no-drop-caches] [--markdown]
 *
 * IDs: convert-random (4 GiB of random bytes), convert-zlib / convert-zstd (`-c`, 1 GiB of
 * half-compressible bytes), fio (the disk's sequential write and read, and the plain convert's floor:
 * reading the source while writing a new file, for reference).
 * Sources are the raw files of bench/lib/fixtures.js, cached in BENCH_DIR (default /tmp/qcow2-bench);
 * each side writes a fresh output (deleted before every run and after the scenario). After the runs,
 * our output must read like qemu-img's (`qemu-img compare`) and pass `qemu-img check` with no
 * errors and no leaks. --small shrinks the sources (for trying the harness; not figures to record).
 */
const fs = require('node:fs');
const os = require('node:os');

const { BENCH_DIR, benchDirUsage, benchPath } = require('../lib/benchdir.js');
const { compareCommands } = require('../lib/compare.js');
const { runFioJob, runFioTogether, STANDARD_JOBS } = require('../lib/fio.js');
const { GiB, MiB, halfCompressibleRaw, randomRaw } = require('../lib/fixtures.js');
const { dropCaches, removeAndSettle, runMeasured } = require('../lib/proc.js');
const { formatKiB, formatMs, formatRatio, markdownTable, printTable } = require('../lib/stats.js');
const { checkScenarioOptions } = require('../lib/options.js');

const USAGE = 'usage: node bench/scenarios/write-path.js [--runs N] [--only ID,ID] [--small] [--no-drop-caches] [--markdown]';
const ALL = ['convert-random', 'convert-zlib', 'convert-zstd', 'fio'];
/** The watchdog kills a command when the bench disk's free space falls below this. */
const MIN_FREE_BYTES = 8 * GiB;

const log = (line) => process.stderr.write(`${line}\n`);

function parseCommandLine(argv) {
  const options = { runs: 3, only: ALL, small: false, dropCaches: true, markdown: false };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--runs') options.runs = Number(argv[++i]);
    else if (arg === '--only') options.only = (argv[++i] ?? '').split(',').filter(Boolean);
    else if (arg === '--small') options.small = true;
    else if (arg === '--no-drop-caches') options.dropCaches = false;
    else if (arg === '--markdown') options.markdown = true;
    else if (arg === '-h' || arg === '--help') return null;
    else throw new Error(`unknown argument '${arg}'\n${USAGE}`);
  }
  return checkScenarioOptions(options, { known: ALL, what: 'scenario', countName: '--runs', count: options.runs });
}

/** Source sizes of the real scenarios, or of the --small trial. */
function sizes(small) {
  return small ? { random: 256 * MiB, compressed: 64 * MiB, fio: '512M' } : { random: 4 * GiB, compressed: GiB, fio: '2G' };
}

/** Kill a command before the disk fills up. */
function diskWatch() {
  const { bavail, bsize } = fs.statfsSync(BENCH_DIR);
  return bavail * bsize < MIN_FREE_BYTES ? `free space in ${BENCH_DIR} fell below ${MIN_FREE_BYTES / GiB} GiB` : '';
}

/** The 1-minute load average: other work on the machine skews every figure. */
function load() {
  return os.loadavg()[0].toFixed(1);
}

/** '' when our output reads like qemu-img's and checks clean, else what is wrong. */
async function verifyOutputs(ours, theirs) {
  const compare = await runMeasured(['qemu-img', 'compare', '-q', '-f', 'qcow2', '-F', 'qcow2', ours, theirs], { stdout: 'capture' });
  if (compare.code !== 0) return compare.code === 1 ? 'outputs DIFFER' : `qemu-img compare failed: ${compare.stderr.trim()}`;
  const checked = await runMeasured(['qemu-img', 'check', '-q', ours], { stdout: 'capture' });
  if (checked.code !== 0) return `qemu-img check of ours: exit ${checked.code} ${checked.stdout.trim()} ${checked.stderr.trim()}`;
  return '';
}

/** "wall (CPU, CPU/wall, peak RSS)" of one side: CPU/wall above 1 means more than one core at work. */
function sideText(side) {
  if (side.failed) return `FAILED (${side.error.split('\n')[0].slice(0, 120)})`;
  const cores = (side.medianCpuMs / side.medianMs).toFixed(2);
  return `${formatMs(side.medianMs)} (CPU ${formatMs(side.medianCpuMs)}, ×${cores} cores, ${formatKiB(side.maxRssKiB)})`;
}

/** Time `qcow2 convert -O qcow2 EXTRA` against qemu-img's on `source`; outputs removed afterwards. */
async function convertScenario(id, title, source, extra, maxRatio, options) {
  const out = { ours: benchPath('out', `${id}-ours.qcow2`), theirs: benchPath('out', `${id}-qemu.qcow2`) };
  const args = (file) => ['convert', '-f', 'raw', '-O', 'qcow2', ...extra, '-t', 'none', '-T', 'none', source, file];
  const loads = [load()];
  try {
    const result = await compareCommands(['qcow2', ...args(out.ours)], ['qemu-img', ...args(out.theirs)], {
      runs: options.runs,
      dropCaches: options.dropCaches,
      watch: diskWatch,
      log,
      before: async (side) => {
        await removeAndSettle(out[side]);
        loads.push(load());
      },
    });
    const problem = result.ours.failed || result.theirs.failed ? '' : await verifyOutputs(out.ours, out.theirs);
    const met = Number.isFinite(result.ratio) ? (result.ratio <= maxRatio && !problem ? 'yes' : 'NO') : 'failed';
    return {
      scenario: title,
      ours: sideText(result.ours),
      theirs: sideText(result.theirs),
      ratio: result.ratio,
      target: `≤ ${maxRatio.toFixed(2)}`,
      met,
      load: `${Math.min(...loads.map(Number)).toFixed(1)}–${Math.max(...loads.map(Number)).toFixed(1)}`,
      note: problem || (result.ours.failed ? '' : 'same content as qemu-img\'s output, qemu-img check clean'),
      commands: [result.ours.command, result.theirs.command],
    };
  } finally {
    fs.rmSync(out.ours, { force: true });
    fs.rmSync(out.theirs, { force: true });
  }
}

/** fio's sequential write and read (1 MiB, depth 16, O_DIRECT) on a scratch file, removed afterwards. */
async function fioFigures(size) {
  const file = benchPath('fio', 'write-path-fio.dat');
  try {
    const results = [];
    for (const job of STANDARD_JOBS.filter((j) => /seq/i.test(j.name))) {
      log(`fio ${job.name} …`);
      results.push({ ...(await runFioJob(job, file, { size, runtime: 10 })), load: load() });
    }
    return results;
  } finally {
    fs.rmSync(file, { force: true });
  }
}

/**
 * The disk's floor for the plain convert: fio reading the random source in 2 MiB requests while it
 * writes a new file of the same size in 2 MiB requests (depth 8 each, both at once, page cache dropped).
 */
async function convertFloor(source, bytes) {
  const scratch = benchPath('fio', 'write-path-target.dat');
  try {
    fs.rmSync(scratch, { force: true });
    dropCaches();
    log('fio: read the source + write a new file (2 MiB, depth 8) …');
    const { command, results } = await runFioTogether([
      { name: 'read-source', filename: source, rw: 'read', bs: '2M', iodepth: 8, size: bytes },
      { name: 'write-target', filename: scratch, rw: 'write', bs: '2M', iodepth: 8, size: bytes },
    ]);
    return results.map((r) => ({ name: `${r.name} (together, ${bytes / MiB} MiB)`, mbps: r.mbps, runtimeMs: r.runtimeMs, load: load(), command }));
  } finally {
    fs.rmSync(scratch, { force: true });
  }
}

async function main() {
  const options = parseCommandLine(process.argv.slice(2));
  if (!options) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  const size = sizes(options.small);
  const want = (id) => options.only.includes(id);
  const rows = [];
  if (want('convert-random')) {
    const source = await randomRaw(size.random, log);
    rows.push(await convertScenario('convert-random', `convert -O qcow2, ${size.random / MiB} MiB random raw`, source, [], 0.75, options));
  }
  for (const type of ['zlib', 'zstd']) {
    if (!want(`convert-${type}`)) continue;
    const source = await halfCompressibleRaw(size.compressed, log);
    const extra = ['-c', '-o', `compression_type=${type}`];
    rows.push(await convertScenario(`convert-${type}`, `convert -c -O qcow2 (${type}), ${size.compressed / MiB} MiB half-compressible raw`, source, extra, 0.6, options));
  }
  const fio = [];
  if (want('fio')) {
    fio.push(...(await fioFigures(size.fio)));
    fio.push(...(await convertFloor(await randomRaw(size.random, log), size.random)));
  }
  report(rows, fio, options);
  const resultsFile = benchPath(`results-write-path-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
  fs.writeFileSync(resultsFile, JSON.stringify({ options, rows, fio }, null, 2) + '\n');
  log(`results saved in ${resultsFile}; bench folder holds ${(benchDirUsage() / GiB).toFixed(1)} GiB`);
}

/** Print the table, fio's figures and the commands, as text or Markdown. */
function report(rows, fio, options) {
  const headers = ['scenario', 'ours', 'qemu-img', 'ratio', 'target', 'met?', 'load', 'note'];
  const cells = rows.map((r) => [r.scenario, r.ours, r.theirs, formatRatio(r.ratio), r.target, r.met, r.load, r.note]);
  const fioHeaders = ['fio (libaio, O_DIRECT)', 'bandwidth', 'time', 'load'];
  const fioCells = fio.map((f) => [f.name, `${f.mbps.toFixed(0)} MB/s`, f.runtimeMs ? formatMs(f.runtimeMs) : '', f.load]);
  const print = options.markdown ? (h, c) => process.stdout.write(markdownTable(h, c) + '\n\n') : printTable;
  print(headers, cells);
  if (fio.length) print(fioHeaders, fioCells);
  for (const r of rows) process.stdout.write(`  ${r.scenario}:\n    ours:   ${r.commands[0]}\n    theirs: ${r.commands[1]}\n`);
  for (const command of new Set(fio.map((f) => f.command).filter(Boolean))) process.stdout.write(`  ${command}\n`);
}

main().catch((error) => {
  process.stderr.write(`${error.stack ?? error}\n`);
  process.exitCode = 1;
});
