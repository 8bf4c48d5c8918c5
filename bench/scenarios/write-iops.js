#!/usr/bin/env node
'use strict';
/**
 * Issue 4's write-IOPS targets: `qcow2 bench -w` against `qemu-img bench -w` with the same
 * arguments on twin images, in pairs, the side that goes first alternating from pair to pair.
 *
 *   node bench/scenarios/write-iops.js [--pairs N] [--only prealloc,empty] [--markdown]
 *
 * prealloc: 4 KiB writes, 16 in flight, -c 100000, into a 1 GiB image made with
 *   preallocation=falloc (twins reused by every pair; one untimed qemu-img bench run on each first,
 *   so that both sides write over blocks the file system has already written once).
 * empty: 4 KiB writes, 16 in flight, -S 65536 -c 20000 (every write allocates a cluster), into a
 *   4 GiB image created afresh for each run: before each pair both twins are deleted and made again,
 *   then the script waits SETTLE_MS, because deleting the last pair's 1.3 GiB files (20,000 extents
 *   each) keeps ext4 and the disk busy for a few seconds (online discard), whichever side runs next.
 * Each pair prints both sides' times (the "Run completed in" line: requests only, as qemu-img
 * times them), IOPS, CPU time of the whole process, the ratio of IOPS (ours / qemu-img's) and the
 * 1-minute load average before the pair; then the median and range of the ratios. At the end each of
 * our images must pass `qemu-img check` with no errors and no leaks and read like qemu-img's.
 * Images live in BENCH_DIR/write-iops (default /tmp/qcow2-bench) and are removed afterwards.
 */
const fs = require('node:fs');
const os = require('node:os');

const { benchPath } = require('../lib/benchdir.js');
const { runMeasured } = require('../lib/proc.js');
const { formatRatio, markdownTable, median, printTable } = require('../lib/stats.js');
const { checkScenarioOptions } = require('../lib/options.js');

const USAGE = 'usage: node bench/scenarios/write-iops.js [--pairs N] [--only prealloc,empty] [--markdown]';

const WORKLOADS = {
  prealloc: {
    title: 'preallocated image, 4 KiB writes in place',
    args: ['-w', '-t', 'none', '-d', '16', '-s', '4k', '-c', '100000'],
    count: 100000,
    create: ['-o', 'preallocation=falloc'],
    size: '1G',
    fresh: false,
    target: 1.3,
  },
  empty: {
    title: 'empty image, every 4 KiB write allocates a cluster',
    args: ['-w', '-t', 'none', '-d', '16', '-s', '4k', '-S', '65536', '-c', '20000'],
    count: 20000,
    create: [],
    size: '4G',
    fresh: true,
    target: 4,
  },
};

/** Pause after deleting and creating the empty twins, before a pair (see the header). */
const SETTLE_MS = 6000;

const log = (line) => process.stderr.write(`${line}\n`);

function parseCommandLine(argv) {
  const options = { pairs: 5, only: Object.keys(WORKLOADS), markdown: false };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--pairs') options.pairs = Number(argv[++i]);
    else if (arg === '--only') options.only = (argv[++i] ?? '').split(',').filter(Boolean);
    else if (arg === '--markdown') options.markdown = true;
    else if (arg === '-h' || arg === '--help') return null;
    else throw new Error(`unknown argument '${arg}'\n${USAGE}`);
  }
  return checkScenarioOptions(options, { known: Object.keys(WORKLOADS), what: 'workload', countName: '--pairs', count: options.pairs });
}

/** The 1-minute load average: other work on the machine skews every figure. */
function load() {
  return os.loadavg()[0];
}

/** Run a command that must succeed; resolves its measurement. */
async function mustRun(argv) {
  const r = await runMeasured(argv, { stdout: 'capture' });
  if (r.code !== 0) throw new Error(`${argv.join(' ')} exited ${r.code}: ${r.stderr.trim()}`);
  return r;
}

async function createImage(file, w) {
  fs.rmSync(file, { force: true });
  await mustRun(['qemu-img', 'create', '-q', '-f', 'qcow2', ...w.create, file, w.size]);
}

/** One side's run: the request time both tools print, and the process's CPU time. */
async function benchRun(tool, w, file) {
  const r = await mustRun([tool, 'bench', ...w.args, file]);
  const m = /Run completed in ([\d.]+) seconds/.exec(r.stdout);
  if (!m) throw new Error(`${tool} bench printed no summary line: ${r.stdout}`);
  return { seconds: Number(m[1]), cpuMs: r.cpuMs };
}

/** '' when our image checks clean and reads like qemu-img's, else what is wrong. */
async function verify(ours, theirs) {
  const checked = await runMeasured(['qemu-img', 'check', '-q', ours], { stdout: 'capture' });
  if (checked.code !== 0) return `qemu-img check of ours: exit ${checked.code} ${checked.stdout.trim()} ${checked.stderr.trim()}`;
  const compare = await runMeasured(['qemu-img', 'compare', '-q', '-f', 'qcow2', '-F', 'qcow2', ours, theirs], { stdout: 'capture' });
  return compare.code === 0 ? '' : `qemu-img compare: exit ${compare.code} ${compare.stderr.trim()}`;
}

/** Run `pairs` pairs of one workload; resolves its rows and summary. */
async function runWorkload(id, pairs) {
  const w = WORKLOADS[id];
  const files = { ours: benchPath('write-iops', `${id}-ours.qcow2`), theirs: benchPath('write-iops', `${id}-qemu.qcow2`) };
  const tools = { ours: 'qcow2', theirs: 'qemu-img' };
  const rows = [];
  const ratios = [];
  try {
    if (!w.fresh) {
      for (const side of ['ours', 'theirs']) {
        await createImage(files[side], w);
        await mustRun(['qemu-img', 'bench', ...w.args, files[side]]);
      }
    }
    for (let pair = 0; pair < pairs; pair++) {
      const order = pair % 2 === 0 ? ['ours', 'theirs'] : ['theirs', 'ours'];
      const result = {};
      if (w.fresh) {
        for (const side of order) await createImage(files[side], w);
        await mustRun(['sync']);
        await new Promise((resolve) => setTimeout(resolve, SETTLE_MS));
      }
      const before = load();
      for (const side of order) result[side] = await benchRun(tools[side], w, files[side]);
      const iops = { ours: w.count / result.ours.seconds, theirs: w.count / result.theirs.seconds };
      const ratio = iops.ours / iops.theirs;
      ratios.push(ratio);
      const row = [
        `${pair + 1} (${order[0] === 'ours' ? 'ours first' : 'qemu first'})`,
        `${result.ours.seconds.toFixed(3)} s, ${Math.round(iops.ours / 1000)}k IOPS, CPU ${(result.ours.cpuMs / 1000).toFixed(2)} s`,
        `${result.theirs.seconds.toFixed(3)} s, ${Math.round(iops.theirs / 1000)}k IOPS, CPU ${(result.theirs.cpuMs / 1000).toFixed(2)} s`,
        formatRatio(ratio),
        before.toFixed(1),
      ];
      rows.push(row);
      log(`${id} pair ${row.join(' | ')}`);
    }
    const problem = await verify(files.ours, files.theirs);
    return { id, w, rows, ratios, problem };
  } finally {
    fs.rmSync(files.ours, { force: true });
    fs.rmSync(files.theirs, { force: true });
  }
}

async function main() {
  const options = parseCommandLine(process.argv.slice(2));
  if (!options) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  const headers = ['pair', 'qcow2 bench', 'qemu-img bench', 'IOPS ours/qemu', 'load'];
  for (const id of options.only) {
    const r = await runWorkload(id, options.pairs);
    const summary =
      `${r.w.title}: median ${formatRatio(median(r.ratios))}× (range ${formatRatio(Math.min(...r.ratios))}–` +
      `${formatRatio(Math.max(...r.ratios))}), target ≥ ${r.w.target}×; ` +
      (r.problem || 'our image checks clean and reads like qemu-img\'s');
    process.stdout.write(`\n${id}: qcow2 bench / qemu-img bench ${r.w.args.join(' ')}\n`);
    if (options.markdown) process.stdout.write(`${markdownTable(headers, r.rows)}\n`);
    else printTable(headers, r.rows);
    process.stdout.write(`${summary}\n`);
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack ?? error}\n`);
  process.exit(1);
});
