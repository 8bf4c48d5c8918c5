/** `qcow2 demo [--keep DIR]` (and `npm start`): a backup agent's day on a sample disk, each step printed with its figures. */
import path from 'node:path';

import type { CompareResult, ImageInfo } from '../index.js';
import { CheckFigures, DemoRun, FileSize, LayerAllocation, StepFailure, StepFigures, StepReport, WriteTotals, runDemo } from '../tools/demo.js';
import { UsageError, lastOption, parseArgs } from './args.js';
import { TextSink, hasFlag } from './common.js';

const SPEC = {
  short: 'h',
  long: {
    keep: { value: true },
    help: { value: false, key: 'h' },
  },
};

const USAGE = `usage: qcow2 demo [--keep DIR]

Makes a sample disk (a qcow2 base with data, zero runs and compressed clusters, and an overlay
on it) in a temporary folder and runs a backup agent's day on it: info, map, a compressed full
backup, check, compare, and an incremental backup. Each step prints its figures and the qcow2
command that does the same. The folder is removed at the end unless --keep DIR names a new or
empty folder to leave the files in. Exits 0 when every step succeeds, 1 otherwise.
`;

const INDENT = '    ';

/** Run `qcow2 demo`; resolves to the exit code. */
export async function run(argv: string[]): Promise<number> {
  const args = parseArgs(argv, SPEC);
  if (hasFlag(args, 'h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (args.positional.length > 0) throw new UsageError(`demo takes no operands, got '${args.positional[0]}'`);
  const out = process.stdout;
  const progress = new ProgressDisplay(out, out.isTTY === true);
  const abort = new AbortController();
  // Ctrl-C stops the demo at its next await, so that its files are still removed.
  const onSignal = () => abort.abort();
  process.once('SIGINT', onSignal);
  let demo: DemoRun;
  try {
    out.write("qcow2 demo: a backup agent's day on a sample disk\n");
    demo = await runDemo({
      keep: lastOption(args, 'keep'),
      signal: abort.signal,
      onStepStart: (index, count, title, command) => out.write(`\n${index}/${count} ${title}\n${INDENT}$ ${command}\n`),
      onProgress: (done, total) => progress.update(done, total),
      onStepDone: (report) => {
        progress.end();
        out.write(stepText(report));
      },
    });
  } finally {
    process.removeListener('SIGINT', onSignal);
  }
  progress.end();
  out.write('\n');
  if (demo.failure) process.stderr.write(failureText(demo, demo.failure));
  else out.write(`All ${demo.steps.length} steps succeeded in ${formatSeconds(totalSeconds(demo))}.\n`);
  out.write(demo.kept ? `The files are in ${demo.dir}\n` : `The temporary folder ${demo.dir} was removed (keep the files with: npm start -- --keep DIR).\n`);
  return demo.failure ? 1 : 0;
}

function totalSeconds(demo: DemoRun): number {
  return demo.steps.reduce((sum, step) => sum + step.seconds, 0);
}

/** Which step failed, and why, for stderr. */
function failureText(demo: DemoRun, failure: StepFailure): string {
  const index = demo.steps.length + 1;
  const message = failure.error.message.replace(/\n/g, `\n${INDENT}`);
  return `FAILED at step ${index} (${failure.step}: ${failure.title})\n${INDENT}${failure.error.code}: ${message}\n`;
}

// ---- One step's figures ----------------------------------------------------------------------

function stepText(report: StepReport): string {
  const lines = figureLines(report.figures);
  const took = `took ${formatSeconds(report.seconds)}`;
  if (report.bytes === 0) {
    lines.push(took);
  } else {
    const rate = report.seconds > 0 ? ` (${formatBytes(report.bytes / report.seconds)}/s)` : '';
    lines.push(`${took}: ${formatBytes(report.bytes)} ${report.bytesLabel}${rate}`);
  }
  return lines.map((line) => `${INDENT}${line}\n`).join('');
}

function figureLines(figures: StepFigures): string[] {
  switch (figures.step) {
    case 'sample':
      return [
        `virtual size ${formatBytes(figures.size)}, clusters of ${formatBytes(figures.clusterSize)}`,
        `base:    ${writesText(figures.base)}`,
        `overlay: ${writesText(figures.overlay)}`,
        ...figures.files.map(fileText),
      ];
    case 'info':
      return figures.chain.map(infoText);
    case 'map':
      return [
        `${figures.extents} extents; ${formatBytes(figures.unallocated)} unallocated (reads as zero)`,
        ...figures.layers.map(layerText),
      ];
    case 'backup':
      return [
        `copied ${formatBytes(figures.copied)} of data (the chain holds ${formatBytes(figures.chainAllocated)})`,
        `${fileText(figures.file)} (compressed to ${percent(figures.file.allocated, figures.copied)} of the data)`,
      ];
    case 'check':
      return [checkText(figures.name, figures.result)];
    case 'compare':
      return [compareText(figures.names, figures.result)];
    case 'changes':
      return [`the guest wrote ${writesText(figures.written)}`, fileText(figures.file)];
    case 'incremental':
      return [`copied ${formatBytes(figures.copied)} of changed data`, fileText(figures.file)];
    case 'verify':
      return [checkText(figures.names[1], figures.check), compareText(figures.names, figures.compare)];
  }
}

function writesText(totals: WriteTotals): string {
  const parts = [`${formatBytes(totals.data)} data`];
  if (totals.zero > 0) parts.push(`${formatBytes(totals.zero)} zeroes`);
  if (totals.compressed > 0) parts.push(`${formatBytes(totals.compressed)} compressed`);
  return parts.join(', ');
}

function fileText(file: FileSize): string {
  return `${file.name} takes ${formatBytes(file.allocated)} on disk`;
}

function infoText(info: ImageInfo): string {
  const cluster = info['cluster-size'] === undefined ? '' : `, cluster ${formatBytes(info['cluster-size'])}`;
  const onDisk = info['actual-size'] === undefined ? '' : `, ${formatBytes(info['actual-size'])} on disk`;
  const compression = info['format-specific'] ? `, ${info['format-specific'].data['compression-type']}` : '';
  const backing = info['backing-filename'] === undefined ? '' : `, backing ${info['backing-filename']} (${info['backing-filename-format'] ?? 'probed'})`;
  return `${path.basename(info.filename)}: ${info.format}, ${formatBytes(info['virtual-size'])} virtual${onDisk}${cluster}${compression}${backing}`;
}

function layerText(layer: LayerAllocation): string {
  const compressed = layer.compressed > 0 ? ` (${formatBytes(layer.compressed)} compressed)` : '';
  return `depth ${layer.depth} ${layer.name}: ${formatBytes(layer.data)} data${compressed}, ${formatBytes(layer.zero)} zero, in ${layer.extents} extents`;
}

function checkText(name: string, result: CheckFigures): string {
  const clusters =
    result.allocatedClusters === undefined
      ? ''
      : `; ${result.allocatedClusters} clusters allocated${result.compressedClusters ? `, ${result.compressedClusters} compressed` : ''}`;
  const end = result.imageEndOffset === undefined ? '' : `; image end offset ${result.imageEndOffset}`;
  return `${name}: no errors were found${clusters}${end}`;
}

function compareText(names: [string, string], result: CompareResult): string {
  return `${names[0]} and ${names[1]}: ${result.identical ? 'images are identical' : `differ (${result.verdict})`}`;
}

// ---- Units and progress ----------------------------------------------------------------------

const UNITS = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB'];

/** Bytes in binary units with three significant digits ("47.1 MiB", "1 GiB"). */
export function formatBytes(bytes: number): string {
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  if (unit === 0) return `${Math.round(value)} bytes`;
  const digits = Number.isInteger(value) ? 0 : value < 10 ? 2 : value < 100 ? 1 : 0;
  return `${value.toFixed(digits)} ${UNITS[unit]}`;
}

/** Seconds as "12 ms" under a second, "1.23 s" above. */
export function formatSeconds(seconds: number): string {
  return seconds < 1 ? `${Math.max(1, Math.round(seconds * 1000))} ms` : `${seconds.toFixed(2)} s`;
}

function percent(part: number, whole: number): string {
  return whole > 0 ? `${Math.round((100 * part) / whole)}%` : '-';
}

/**
 * Progress of a long step: a bar redrawn in place on a terminal; elsewhere (a pipe, a log) one
 * plain line that grows by a mark every 10 %.
 */
export class ProgressDisplay {
  #shown = -1;
  #active = false;

  constructor(
    private readonly out: TextSink,
    private readonly terminal: boolean,
  ) {}

  /** Show `done` of `total` bytes. */
  update(done: number, total: number): void {
    const value = total > 0 ? Math.min(100, Math.floor((100 * done) / total)) : 100;
    if (this.terminal) this.#bar(value, done, total);
    else this.#marks(value);
  }

  /** Close the display, if one is open. */
  end(): void {
    if (this.#active) this.out.write('\n');
    this.#active = false;
    this.#shown = -1;
  }

  #bar(value: number, done: number, total: number): void {
    if (value === this.#shown) return;
    const width = 30;
    const filled = Math.round((value * width) / 100);
    const bar = '#'.repeat(filled) + '.'.repeat(width - filled);
    this.out.write(`\r${INDENT}[${bar}] ${String(value).padStart(3)}%  ${formatBytes(done)} of ${formatBytes(total)}\x1b[K`);
    this.#shown = value;
    this.#active = true;
  }

  #marks(value: number): void {
    const mark = value - (value % 10);
    if (mark <= this.#shown) return;
    this.out.write(this.#active ? ` ${mark}%` : `${INDENT}progress: ${mark}%`);
    this.#shown = mark;
    this.#active = true;
  }
}
