#!/usr/bin/env node
'use strict';
/**
 * Issue 3's read-path scenarios: ours vs qemu-img side by side, cache mode none on both sides.
 *
 *   node bench/scenarios/read-path.js [--runs N] [--only ID,ID] [--small] [--no-drop-caches] [--markdown] [--clean]
 *
 * IDs: convert-full, convert-aged, convert-zlib, convert-zstd, map-aged, randread, memory, fio.
 * Images are built once in BENCH_DIR (default /tmp/qcow2-bench) and reused; --clean removes the folder
 * and exits. --small shrinks every image (for trying the harness; not figures to record).
 */
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const { BENCH_DIR, benchDirUsage, benchPath, cleanBenchDir } = require('../lib/benchdir.js');
const { compareCommands } = require('../lib/compare.js');
const { runFioJob, runFioTogether, STANDARD_JOBS } = require('../lib/fio.js');
const { GiB, MiB, agedQcow2, compressedQcow2, fullQcow2 } = require('../lib/fixtures.js');
const { dropCaches, removeAndSettle, runChecked, runMeasured, toArgv } = require('../lib/proc.js');
const { formatBytes, formatCount, formatKiB, formatMs, formatRatio, markdownTable, median, printTable } = require('../lib/stats.js');
const { checkScenarioOptions } = require('../lib/options.js');

const USAGE =
  'usage: node bench/scenarios/read-path.js [--runs N] [--only ID,ID] [--small] [--no-drop-caches] [--markdown] [--read-count N] [--clean]';
const ALL = ['convert-full', 'convert-aged', 'convert-zlib', 'convert-zstd', 'map-aged', 'randread', 'memory', 'fio'];
const MEMORY_LIMIT_KIB = 256 * 1024;
/** The watchdog kills a command when the bench disk's free space falls below this. */
const MIN_FREE_BYTES = 12 * GiB;

function parseCommandLine(argv) {
  const options = { runs: 3, only: ALL, small: false, dropCaches: true, markdown: false, clean: false, readCount: 500000 };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--runs') options.runs = Number(argv[++i]);
    else if (arg === '--only') options.only = (argv[++i] ?? '').split(',').filter(Boolean);
    else if (arg === '--small') options.small = true;
    else if (arg === '--no-drop-caches') options.dropCaches = false;
    else if (arg === '--markdown') options.markdown = true;
    else if (arg === '--clean') options.clean = true;
    else if (arg === '--read-count') options.readCount = Number(argv[++i]);
    else if (arg === '-h' || arg === '--help') return null;
    else throw new Error(`unknown argument '${arg}'\n${USAGE}`);
  }
  return checkScenarioOptions(options, { known: ALL, what: 'scenario', countName: '--runs', count: options.runs });
}

/** Image sizes of the real scenarios, or of the --small trial. */
function sizes(small) {
  return small
    ? { full: 256 * MiB, aged: 4 * GiB, compressed: 64 * MiB, baseline: 64 * MiB, fio: '512M' }
    : { full: 4 * GiB, aged: 64 * GiB, compressed: GiB, baseline: 256 * MiB, fio: '2G' };
}

const log = (line) => process.stderr.write(`${line}\n`);

/** Kill a command before the disk fills up (our side might write zeroes where qemu-img leaves holes). */
function diskWatch() {
  const { bavail, bsize } = fs.statfsSync(BENCH_DIR);
  return bavail * bsize < MIN_FREE_BYTES ? `free space in ${BENCH_DIR} fell below ${MIN_FREE_BYTES / GiB} GiB` : '';
}

/** `qemu-img compare` of the two outputs; '' when identical, else what differs. */
async function compareOutputs(a, b) {
  const r = await runMeasured(['qemu-img', 'compare', '-q', '-f', 'raw', '-F', 'raw', a, b], { stdout: 'capture' });
  if (r.code === 0) return '';
  return r.code === 1 ? 'outputs DIFFER' : `qemu-img compare failed: ${r.stderr.trim()}`;
}

/** The first line of a message, for a table cell. */
function oneLine(text) {
  return String(text).trim().split('\n')[0];
}

/** A row of the final table, stamped with the load average at the time it was made. */
function row(fields) {
  return { ours: '-', theirs: '-', ratio: NaN, target: '', met: 'n/a', note: '', load: load(), ...fields };
}

/** Time `qcow2 convert` against `qemu-img convert` on `image`; outputs removed afterwards. */
async function convertScenario(id, title, image, maxRatio, options, memory, kind) {
  const outOurs = benchPath('out', `${id}-ours.raw`);
  const outTheirs = benchPath('out', `${id}-qemu.raw`);
  const args = (out) => ['convert', '-f', 'qcow2', '-O', 'raw', '-t', 'none', '-T', 'none', image, out];
  try {
    const result = await compareCommands(['qcow2', ...args(outOurs)], ['qemu-img', ...args(outTheirs)], {
      runs: options.runs,
      dropCaches: options.dropCaches,
      watch: diskWatch,
      log,
      before: (side) => removeAndSettle(side === 'ours' ? outOurs : outTheirs),
    });
    const same = result.ours.failed ? '' : await compareOutputs(outOurs, outTheirs);
    memory.push({ what: title, kind, imageSize: fileSizes(image), kib: result.ours.maxRssKiB, failed: result.ours.failed });
    return comparisonRow(title, result, maxRatio, same ? same : result.ours.failed ? '' : 'output identical to qemu-img\'s');
  } finally {
    fs.rmSync(outOurs, { force: true });
    fs.rmSync(outTheirs, { force: true });
  }
}

/** "virtual X, file Y" of an image, for the memory table. */
function fileSizes(image) {
  const info = JSON.parse(spawnSync('qemu-img', ['info', '--output=json', image], { encoding: 'utf8' }).stdout);
  return `virtual ${formatBytes(info['virtual-size'])}, file ${formatBytes(info['actual-size'])}`;
}

/** "wall (CPU, peak RSS)" of one side. */
function sideText(side) {
  return `${formatMs(side.medianMs)} (CPU ${formatMs(side.medianCpuMs)}, ${formatKiB(side.maxRssKiB)})`;
}

/** The table row of a wall-time comparison. */
function comparisonRow(title, result, maxRatio, note) {
  const met = Number.isFinite(result.ratio) ? (result.ratio <= maxRatio ? 'yes' : 'NO') : 'failed';
  const fail = (side) => (side.failed ? `FAILED (${oneLine(side.error).slice(0, 120)})` : '');
  return row({
    scenario: title,
    ours: fail(result.ours) || sideText(result.ours),
    theirs: fail(result.theirs) || sideText(result.theirs),
    ratio: result.ratio,
    target: `≤ ${maxRatio.toFixed(2)}`,
    met,
    note,
    commands: [result.ours.command, result.theirs.command],
  });
}

/**
 * `map --output=json` of the aged image, both outputs kept for a byte comparison. After the page
 * cache is dropped, each side's program runs once untimed (`--help`), so that the image's metadata
 * is read cold while the programs are loaded, as for a tool that runs often: node's own start
 * from a cold cache costs 0.2-0.45 s on this machine, more than qemu-img's whole map.
 */
async function mapScenario(title, image, options) {
  const outOurs = benchPath('out', 'map-ours.json');
  const outTheirs = benchPath('out', 'map-qemu.json');
  const args = ['map', '-f', 'qcow2', '--output=json', image];
  const warm = { ours: toArgv(['qcow2', 'map', '--help']), theirs: ['qemu-img', '--help'] };
  const result = await compareCommands(['qcow2', ...args], ['qemu-img', ...args], {
    runs: options.runs,
    dropCaches: options.dropCaches,
    afterDrop: (side) => {
      spawnSync(warm[side][0], warm[side].slice(1), { stdio: 'ignore' });
    },
    log,
    stdout: { ours: outOurs, theirs: outTheirs },
  });
  let note = '';
  if (!result.ours.failed && !result.theirs.failed) {
    note = fs.readFileSync(outOurs).equals(fs.readFileSync(outTheirs)) ? 'output identical to qemu-img\'s' : `output DIFFERS (${outOurs} vs ${outTheirs})`;
  }
  const lines = result.theirs.failed ? 0 : fs.readFileSync(outTheirs, 'utf8').split('\n').length - 1;
  return comparisonRow(`map --output=json, ${title}`, result, 1.0, `${note}; ${formatCount(lines)} lines`);
}

/** IOPS from `qemu-img bench` output ("Run completed in X seconds."). */
function qemuBenchIops(result, count) {
  const m = /Run completed in ([\d.]+) seconds/.exec(result.stdout);
  if (result.code !== 0 || !m) throw new Error(`bench failed: ${oneLine(result.stderr) || oneLine(result.stdout)}`);
  return count / Number(m[1]);
}

/** IOPS of our library (bench/lib/readload.js) in its own process. */
function readloadIops(result) {
  if (result.code !== 0) throw new Error(oneLine(result.stderr) || `exit ${result.code ?? result.signal}`);
  return JSON.parse(result.stdout).iops;
}

/** Random (and qemu-img-bench-like sequential) 4 KiB reads at depth 16: ours, qemu-img bench, fio. */
async function randreadScenario(image, options) {
  const count = options.readCount;
  const readload = (pattern) => [process.execPath, path.join(__dirname, '..', 'lib', 'readload.js'), image, '--depth', '16', '--size', '4096', '--count', String(count), '--pattern', pattern];
  const benchArgs = ['bench', '-f', 'qcow2', '-t', 'none', '-d', '16', '-s', '4k', '-c', String(count), image];
  const qemuBench = ['qemu-img', ...benchArgs];
  const oursBench = ['qcow2', ...benchArgs];
  const figures = { random: [], sequential: [], qemu: [], bench: [] };
  const errors = {};
  const attempt = async (key, command, parse) => {
    if (errors[key]) return;
    if (options.dropCaches) dropCaches();
    try {
      figures[key].push(parse(await runMeasured(command, { stdout: 'capture' })));
    } catch (error) {
      errors[key] = error.message;
      log(`  ${key}: FAILED ${error.message}`);
    }
  };
  for (let r = 0; r < options.runs; r++) {
    await attempt('random', readload('random'), readloadIops);
    await attempt('qemu', qemuBench, (res) => qemuBenchIops(res, count));
    await attempt('sequential', readload('sequential'), readloadIops);
    await attempt('bench', oursBench, (res) => qemuBenchIops(res, count));
    log(`  round ${r + 1}: ours random ${formatCount(figures.random.at(-1))}, qemu-img bench ${formatCount(figures.qemu.at(-1))}, ours sequential ${formatCount(figures.sequential.at(-1))}, qcow2 bench ${formatCount(figures.bench.at(-1))} IOPS`);
  }
  const fio = await runFioJob({ name: 'randread-image', rw: 'randread', bs: '4k', iodepth: 16, readonly: true }, image, { runtime: 10 });
  const med = { random: median(figures.random), sequential: median(figures.sequential), qemu: median(figures.qemu), bench: median(figures.bench) };
  const iops = (key) => (errors[key] ? `FAILED (${errors[key].slice(0, 120)})` : `${formatCount(med[key])} IOPS`);
  const commands = [`${readload('random').join(' ')}; qcow2 ${benchArgs.join(' ')}`, `${qemuBench.join(' ')}; ${fio.command}`];
  const ratioRow = (scenario, key, theirs, theirsText, min, note) => {
    const ratio = errors[key] ? NaN : med[key] / theirs;
    return row({
      scenario,
      ours: iops(key),
      theirs: theirsText,
      ratio,
      target: `≥ ${min.toFixed(2)}`,
      met: Number.isFinite(ratio) ? (ratio >= min ? 'yes' : 'NO') : 'failed',
      note,
      commands,
    });
  };
  const qemuText = errors.qemu ? `FAILED (${errors.qemu.slice(0, 120)})` : `${formatCount(med.qemu)} IOPS`;
  return [
    ratioRow('4 KiB reads depth 16, library, random vs qemu-img bench', 'random', med.qemu, qemuText, 1.0, 'qemu-img bench reads sequentially (4 KiB steps); ratio of IOPS'),
    ratioRow('4 KiB reads depth 16, library, same sequential pattern as qemu-img bench', 'sequential', med.qemu, qemuText, 1.0, 'ratio of IOPS'),
    ratioRow('qcow2 bench vs qemu-img bench (4 KiB, depth 16, same command line)', 'bench', med.qemu, qemuText, 1.0, 'ratio of IOPS'),
    ratioRow('4 KiB random reads depth 16, library vs fio randread', 'random', fio.iops, `fio ${formatCount(fio.iops)} IOPS`, 0.9, 'fio randread on the image file'),
  ];
}

/**
 * Peak RSS of our convert against the limit, and across image sizes: an image of a kind (full,
 * aged) is compared with the smaller one of the same kind, and counts as flat when it needs at most
 * 25 % + 16 MiB more.
 */
function memoryRows(memory) {
  return memory.map((m) => {
    const smaller = memory.find((o) => o.kind === m.kind && o !== m && !o.failed && memory.indexOf(o) < memory.indexOf(m));
    const flat = smaller ? m.kib <= smaller.kib * 1.25 + 16 * 1024 : true;
    const within = m.kib <= MEMORY_LIMIT_KIB;
    return row({
      scenario: `peak RSS of our ${m.what} (${m.imageSize})`,
      ours: m.failed ? 'FAILED' : formatKiB(m.kib),
      theirs: smaller ? `smaller ${m.kind} image: ${formatKiB(smaller.kib)}` : '-',
      target: '≤ 256 MiB, flat in image size',
      met: m.failed ? 'failed' : within && flat ? 'yes' : 'NO',
      note: smaller ? (flat ? 'flat against the smaller image' : 'GROWS with the image') : '',
    });
  });
}

/** fio's standard jobs on a file of the bench folder, removed afterwards. */
async function fioFigures(size) {
  const file = benchPath('fio', 'fio-test.dat');
  try {
    const results = [];
    for (const job of [STANDARD_JOBS[1], STANDARD_JOBS[0], STANDARD_JOBS[2], STANDARD_JOBS[3]]) {
      log(`fio ${job.name} …`);
      results.push(await runFioJob(job, file, { size, runtime: 10 }));
    }
    return results;
  } finally {
    fs.rmSync(file, { force: true });
  }
}

/**
 * The disk's floor for each convert shape, measured with fio: reading the image while writing a
 * new file, with the request sizes and order of the convert. Files written are removed.
 */
async function convertFloors(images) {
  const floors = [];
  const scratch = benchPath('fio', 'convert-target.dat');
  const shapes = [];
  if (images.full) {
    shapes.push({
      what: `read the ${formatBytes(images.full.size)} full image + write a new file (2 MiB, depth 8)`,
      jobs: [
        { name: 'read-image', filename: images.full.path, rw: 'read', bs: '2M', iodepth: 8, size: images.full.size },
        { name: 'write-target', filename: scratch, rw: 'write', bs: '2M', iodepth: 8, size: images.full.size },
      ],
    });
  }
  if (images.aged) {
    const dataBytes = Math.round(images.aged.size / 65536 * 0.1) * 65536;
    shapes.push({
      what: `64 KiB random reads of the aged image + 64 KiB writes with 576 KiB gaps into a sparse ${formatBytes(images.aged.size)} file (depth 8), ${formatBytes(dataBytes)} each`,
      sparse: images.aged.size,
      jobs: [
        { name: 'read-image', filename: images.aged.path, rw: 'randread', bs: '64k', iodepth: 8, ioSize: dataBytes },
        { name: 'write-target', filename: scratch, rw: 'write:576k', bs: '64k', iodepth: 8, size: images.aged.size, ioSize: dataBytes },
      ],
    });
  }
  for (const shape of shapes) {
    try {
      fs.rmSync(scratch, { force: true });
      if (shape.sparse) {
        fs.writeFileSync(scratch, '');
        fs.truncateSync(scratch, shape.sparse);
      }
      if (dropCaches() === false) log('fio: could not drop the page cache');
      log(`fio: ${shape.what} …`);
      const { command, results } = await runFioTogether(shape.jobs);
      floors.push({ what: shape.what, command, results, floorMs: Math.max(...results.map((r) => r.runtimeMs)) });
    } catch (error) {
      log(`fio: FAILED ${error.message}`);
    } finally {
      fs.rmSync(scratch, { force: true });
    }
  }
  return floors;
}

/** Run `fn`, turning a failure (e.g. a fixture that would not build) into a failed row. */
async function guarded(title, fn) {
  try {
    return await fn();
  } catch (error) {
    log(`${title}: FAILED ${error.stack ?? error}`);
    return row({ scenario: title, ours: `FAILED (${oneLine(error.message).slice(0, 160)})`, met: 'failed' });
  }
}

function machine() {
  const qemu = spawnSync('qemu-img', ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0];
  return `${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), ${(os.totalmem() / GiB).toFixed(0)} GiB RAM, Linux ${os.release()}, node ${process.version}, ${qemu}`;
}

/** The 1-minute load average: other work on the machine skews every figure. */
function load() {
  return os.loadavg()[0].toFixed(1);
}

async function main() {
  const options = parseCommandLine(process.argv.slice(2));
  if (!options) {
    process.stdout.write(`${USAGE}\nscenarios: ${ALL.join(', ')}\n`);
    return;
  }
  if (options.clean) {
    cleanBenchDir();
    process.stdout.write(`removed ${BENCH_DIR}\n`);
    return;
  }
  const size = sizes(options.small);
  const want = (id) => options.only.includes(id);
  const rows = [];
  const memory = [];
  const floorImages = {};
  log(`bench folder ${BENCH_DIR}; ${options.runs} runs per side; page cache ${options.dropCaches ? 'dropped before every run' : 'kept'}`);
  if (want('memory')) {
    // A small image first: the peak RSS of the big converts is judged against this one's.
    await guarded('convert baseline (memory)', async () => convertScenario('convert-baseline', `convert -O raw, ${formatBytes(size.baseline)} fully allocated qcow2`, await fullQcow2(size.baseline, log), Infinity, { ...options, runs: 1 }, memory, 'full'));
    const half = `${formatBytes(size.aged / 2)} aged qcow2 (10 % of clusters)`;
    await guarded('convert aged baseline (memory)', async () => convertScenario('convert-aged-baseline', `convert -O raw, ${half}`, await agedQcow2(size.aged / 2, 0.1, log), Infinity, { ...options, runs: 1 }, memory, 'aged'));
  }
  if (want('convert-full')) {
    rows.push(await guarded('convert -O raw, full qcow2', async () => {
      const image = await fullQcow2(size.full, log);
      floorImages.full = { path: image, size: size.full };
      return convertScenario('convert-full', `convert -O raw, ${formatBytes(size.full)} fully allocated qcow2`, image, 0.75, options, memory, 'full');
    }));
  }
  if (want('convert-aged') || want('map-aged')) {
    const title = `${formatBytes(size.aged)} aged qcow2 (10 % of clusters)`;
    let image;
    try {
      image = await agedQcow2(size.aged, 0.1, log);
      if (want('convert-aged')) floorImages.aged = { path: image, size: size.aged };
    } catch (error) {
      rows.push(row({ scenario: title, ours: `FAILED building: ${error.message}`, met: 'failed' }));
    }
    if (image && want('convert-aged')) rows.push(await guarded(`convert -O raw, ${title}`, () => convertScenario('convert-aged', `convert -O raw, ${title}`, image, 0.6, options, memory, 'aged')));
    if (image && want('map-aged')) rows.push(await guarded('map, aged', () => mapScenario(title, image, options)));
  }
  for (const type of ['zlib', 'zstd']) {
    if (!want(`convert-${type}`)) continue;
    const title = `convert -O raw, ${formatBytes(size.compressed)} ${type}-compressed qcow2 (half-compressible)`;
    rows.push(await guarded(title, async () => convertScenario(`convert-${type}`, title, await compressedQcow2(size.compressed, type, log), 0.6, options, memory, type)));
  }
  if (want('randread')) {
    const result = await guarded('random reads', async () => randreadScenario(await fullQcow2(size.full, log), options));
    rows.push(...[result].flat());
  }
  if (want('memory')) rows.push(...memoryRows(memory));
  let fio = [];
  let floors = [];
  if (want('fio')) {
    try {
      fio = await fioFigures(size.fio);
    } catch (error) {
      log(`fio: FAILED ${error.message}`);
    }
    floors = await convertFloors(floorImages);
  }
  report(rows, fio, floors, options);
  const resultsFile = benchPath(`results-read-path-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
  fs.writeFileSync(resultsFile, JSON.stringify({ machine: machine(), options, rows, fio, floors }, null, 2) + '\n');
  log(`results saved in ${resultsFile}; bench folder holds ${(benchDirUsage() / GiB).toFixed(1)} GiB`);
}

/** Print the table (and the fio figures) as text or Markdown. */
function report(rows, fio, floors, options) {
  const headers = ['scenario', 'ours', 'qemu-img / reference', 'ratio', 'target', 'met?', 'load', 'note'];
  const cells = rows.map((r) => [r.scenario, r.ours, r.theirs, formatRatio(r.ratio), r.target, r.met, r.load, r.note]);
  const fioHeaders = ['fio (libaio, O_DIRECT, depth 16)', 'bandwidth', 'IOPS'];
  const fioCells = fio.map((f) => [f.name, `${f.mbps.toFixed(0)} MB/s`, formatCount(f.iops)]);
  const floorHeaders = ['disk floor of a convert (fio, both jobs at once)', 'read', 'write', 'floor'];
  const floorCells = floors.map((f) => {
    const [read, write] = f.results;
    return [f.what, `${formatMs(read.runtimeMs)} (${read.mbps.toFixed(0)} MB/s)`, `${formatMs(write.runtimeMs)} (${write.mbps.toFixed(0)} MB/s)`, formatMs(f.floorMs)];
  });
  process.stdout.write(`${machine()}\n`);
  if (options.markdown) {
    process.stdout.write(markdownTable(headers, cells) + '\n\n');
    if (fio.length) process.stdout.write(markdownTable(fioHeaders, fioCells) + '\n\n');
    if (floors.length) process.stdout.write(markdownTable(floorHeaders, floorCells) + '\n');
  } else {
    printTable(headers, cells);
    if (fio.length) printTable(fioHeaders, fioCells);
    if (floors.length) printTable(floorHeaders, floorCells);
  }
  for (const f of floors) process.stdout.write(`  ${f.command}\n`);
  const printed = new Set();
  for (const r of rows) {
    if (!r.commands || printed.has(r.commands.join())) continue;
    printed.add(r.commands.join());
    process.stdout.write(`  ${r.scenario}:\n    ours:   ${r.commands[0]}\n    theirs: ${r.commands[1]}\n`);
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack ?? error}\n`);
  process.exitCode = 1;
});
