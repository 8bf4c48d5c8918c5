/**
 * The quick-start demo (library side of `qcow2 demo` and `npm start`): it makes a sample disk —
 * a sparse qcow2 base with data, zero runs and compressed clusters, and an overlay on it — and
 * runs a backup agent's day on it. It uses only the package's public API, so it doubles as an
 * example of each call.
 */
import { mkdir, mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

import { ErrorCodes, Qcow2Error, check, checkExitCode, compareImages, convert, create, infoChain, open, openQcow2 } from '../index.js';
import type { CompareResult, Image, ImageInfo, Qcow2Image } from '../index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** The sample disk's virtual size: far more than it holds, as a real disk is. */
export const SAMPLE_SIZE = 1024 * MiB;

/** The sample's cluster size: qemu-img's default. */
export const SAMPLE_CLUSTER_SIZE = 64 * KiB;

/** The files the demo makes, by role. */
export const DEMO_FILES = {
  /** The base image: the disk as it was installed. */
  base: 'base.qcow2',
  /** The disk the guest runs on: an overlay on the base. */
  overlay: 'overlay.qcow2',
  /** The full backup of the overlay (its whole chain, compressed). */
  backup: 'backup.qcow2',
  /** The layer the guest writes into after the backup point. */
  top: 'overlay2.qcow2',
  /** The incremental backup: what the guest wrote since the backup point, on top of the full backup. */
  incremental: 'incremental.qcow2',
} as const;

/** One write of the sample: data, zeroes, or data stored compressed. */
export interface SampleWrite {
  kind: 'data' | 'zero' | 'compressed';
  /** Guest offset. */
  offset: number;
  length: number;
  /** For zeroes: let the image free the space instead of storing zeroes. */
  unmap?: boolean;
}

/** What the base holds: an installed system, a zeroed swap area, compressed packages and scattered files. */
export const BASE_WRITES: readonly SampleWrite[] = [
  { kind: 'data', offset: 0, length: 16 * MiB },
  { kind: 'zero', offset: 16 * MiB, length: 8 * MiB },
  { kind: 'compressed', offset: 32 * MiB, length: 8 * MiB },
  ...Array.from({ length: 15 }, (_, i): SampleWrite => ({ kind: 'data', offset: (i + 1) * 64 * MiB, length: MiB })),
];

/** What the guest wrote into the overlay: rewrites, a deleted file, a small write into a compressed cluster, new data. */
export const OVERLAY_WRITES: readonly SampleWrite[] = [
  { kind: 'data', offset: 4 * MiB, length: 4 * MiB },
  { kind: 'zero', offset: 12 * MiB, length: MiB, unmap: true },
  { kind: 'data', offset: 33 * MiB + 4 * KiB, length: 4 * KiB },
  { kind: 'data', offset: 512 * MiB, length: 8 * MiB },
];

/** What the guest writes after the backup point: the changes the incremental backup must carry. */
export const LATER_WRITES: readonly SampleWrite[] = [
  { kind: 'data', offset: 0, length: 64 * KiB },
  { kind: 'data', offset: 100 * MiB, length: 2 * MiB },
  { kind: 'zero', offset: 519 * MiB, length: MiB, unmap: true },
];

/** Bytes written, by kind. */
export interface WriteTotals {
  data: number;
  zero: number;
  compressed: number;
}

/** A file the demo made, and its size on the host. */
export interface FileSize {
  name: string;
  /** Bytes the file takes on disk (allocated blocks, as `du` counts them). */
  allocated: number;
}

/** What one layer of a chain supplies to the disk. */
export interface LayerAllocation {
  /** 0 is the image itself, 1 its backing file, … */
  depth: number;
  name: string;
  /** Bytes of data the layer supplies, compressed ones included. */
  data: number;
  /** Bytes of data stored compressed. */
  compressed: number;
  /** Bytes the layer says read as zero. */
  zero: number;
  /** Runs of the map (consecutive runs of one kind merged). */
  extents: number;
}

/** What a check of a backup found: the `qcow2 check` result, and whether it is clean. */
export interface CheckFigures {
  clean: boolean;
  /** Problems of each kind (all 0 when clean). */
  corruptions: number;
  leaks: number;
  checkErrors: number;
  allocatedClusters?: number;
  compressedClusters?: number;
  imageEndOffset?: number;
  /** The problems in qemu-img's words. */
  messages: string[];
}

/** The figures of each step, told apart by `step`. */
export type StepFigures =
  | { step: 'sample'; size: number; clusterSize: number; base: WriteTotals; overlay: WriteTotals; files: FileSize[] }
  | { step: 'info'; chain: ImageInfo[] }
  | { step: 'map'; size: number; layers: LayerAllocation[]; unallocated: number; extents: number }
  | { step: 'backup'; copied: number; file: FileSize; chainAllocated: number }
  | { step: 'check'; name: string; result: CheckFigures }
  | { step: 'compare'; names: [string, string]; result: CompareResult }
  | { step: 'changes'; written: WriteTotals; file: FileSize }
  | { step: 'incremental'; copied: number; file: FileSize }
  | { step: 'verify'; check: CheckFigures; compare: CompareResult; names: [string, string] };

/** The name of a step. */
export type StepName = StepFigures['step'];

/** How one step went: what it did, the equivalent command, how long it took and how many bytes it handled. */
export interface StepReport {
  figures: StepFigures;
  title: string;
  /** The `qcow2` command line that does the same (on the files in the demo's folder). */
  command: string;
  seconds: number;
  /** Bytes the step handled (written, copied, checked or compared: `bytesLabel` says which); 0 when it reads metadata only. */
  bytes: number;
  bytesLabel: string;
}

/** A step that failed, and why. */
export interface StepFailure {
  step: StepName;
  title: string;
  error: Qcow2Error;
}

/** Callbacks through which the caller follows the demo as it runs. */
export interface DemoEvents {
  /** A step starts: `index` counts from 1 to `count`. */
  onStepStart?: (index: number, count: number, title: string, command: string) => void;
  /** A long step advances: `done` of `total` bytes. */
  onProgress?: (done: number, total: number) => void;
  /** A step ended well. */
  onStepDone?: (report: StepReport) => void;
}

/** How the demo runs. */
export interface DemoOptions extends DemoEvents {
  /** Make the files in this folder (created if missing, must be empty) and keep them; default: a temporary folder, removed at the end. */
  keep?: string;
  /** Stops the demo between steps and inside long ones; the files are still cleaned up. */
  signal?: AbortSignal;
}

/** The outcome of the demo: each step that ran, and the one that failed, if any. */
export interface DemoRun {
  /** The folder the files were made in (removed unless `keep` was given). */
  dir: string;
  kept: boolean;
  steps: StepReport[];
  failure?: StepFailure;
}

/** What the steps share: the folder and the paths of the files. */
interface DemoContext {
  dir: string;
  file: (role: keyof typeof DEMO_FILES) => string;
  signal?: AbortSignal;
  onProgress?: (done: number, total: number) => void;
}

/** What a step's work gives back: its figures and the bytes it handled. */
interface StepOutcome {
  figures: StepFigures;
  bytes: number;
}

/** One step of the day. */
interface DemoStep {
  name: StepName;
  title: string;
  command: string;
  bytesLabel: string;
  run: (context: DemoContext) => Promise<StepOutcome>;
}

const F = DEMO_FILES;

/** The backup agent's day, in order; each step needs the files the steps before it made. */
export const DEMO_STEPS: readonly DemoStep[] = [
  {
    name: 'sample',
    title: 'Make a sample disk: a base with data, zeroes and compressed clusters, and an overlay on it',
    command: `qcow2 create -f qcow2 ${F.base} 1G; qcow2 create -f qcow2 -b ${F.base} -F qcow2 ${F.overlay}; writes`,
    bytesLabel: 'written',
    run: makeSample,
  },
  {
    name: 'info',
    title: 'Look at the disk and its backing chain',
    command: `qcow2 info --backing-chain ${F.overlay}`,
    bytesLabel: '',
    run: describeChain,
  },
  {
    name: 'map',
    title: 'Map what is allocated, layer by layer',
    command: `qcow2 map --output=json ${F.overlay}`,
    bytesLabel: 'of virtual disk mapped',
    run: mapAllocation,
  },
  {
    name: 'backup',
    title: 'Full backup: the whole chain into one compressed image',
    command: `qcow2 convert -p -c -O qcow2 ${F.overlay} ${F.backup}`,
    bytesLabel: 'of data copied',
    run: fullBackup,
  },
  {
    name: 'check',
    title: 'Check the backup',
    command: `qcow2 check ${F.backup}`,
    bytesLabel: 'of image checked',
    run: checkBackup,
  },
  {
    name: 'compare',
    title: 'Compare the backup with the disk',
    command: `qcow2 compare ${F.overlay} ${F.backup}`,
    bytesLabel: 'of virtual disk compared',
    run: compareBackup,
  },
  {
    name: 'changes',
    title: 'Backup point: the guest goes on writing into a new layer',
    command: `qcow2 create -f qcow2 -b ${F.overlay} -F qcow2 ${F.top}; writes`,
    bytesLabel: 'written',
    run: writeChanges,
  },
  {
    name: 'incremental',
    title: 'Incremental backup: only what changed since the backup point, on top of the full backup',
    command: `qcow2 convert -p -c -O qcow2 -B ${F.backup} -F qcow2 ${F.top} ${F.incremental}`,
    bytesLabel: 'of data copied',
    run: incrementalBackup,
  },
  {
    name: 'verify',
    title: 'Check the incremental backup and compare its chain with the disk',
    command: `qcow2 check ${F.incremental} && qcow2 compare ${F.top} ${F.incremental}`,
    bytesLabel: 'of virtual disk compared',
    run: verifyIncremental,
  },
];

/**
 * Run the demo: make the sample disk and run the day's steps in order, stopping at the first
 * that fails. The files are removed at the end, failure or not, unless `options.keep` names a
 * folder for them.
 */
export async function runDemo(options: DemoOptions = {}): Promise<DemoRun> {
  const dir = options.keep === undefined ? await mkdtemp(path.join(os.tmpdir(), 'qcow2-demo-')) : await prepareKeepDir(options.keep);
  const context: DemoContext = {
    dir,
    file: (role) => path.join(dir, DEMO_FILES[role]),
    signal: options.signal,
    onProgress: options.onProgress,
  };
  const run: DemoRun = { dir, kept: options.keep !== undefined, steps: [] };
  try {
    for (const [i, step] of DEMO_STEPS.entries()) {
      options.onStepStart?.(i + 1, DEMO_STEPS.length, step.title, step.command);
      try {
        const report = await runStep(step, context);
        run.steps.push(report);
        options.onStepDone?.(report);
      } catch (error) {
        run.failure = { step: step.name, title: step.title, error: asError(error) };
        break;
      }
    }
  } finally {
    if (!run.kept) await rm(dir, { recursive: true, force: true });
  }
  return run;
}

/** The folder given with --keep: created when missing; refused when it holds anything, so nothing of the user's is overwritten. */
async function prepareKeepDir(dir: string): Promise<string> {
  if (typeof dir !== 'string' || dir === '') throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, 'demo: keep must name a folder');
  await mkdir(dir, { recursive: true }).catch((error: unknown) => {
    throw asError(error);
  });
  const entries = await readdir(dir).catch((error: unknown) => {
    throw asError(error);
  });
  if (entries.length > 0) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `demo: '${dir}' is not empty (${entries.length} entries); give a new or empty folder`);
  }
  return path.resolve(dir);
}

async function runStep(step: DemoStep, context: DemoContext): Promise<StepReport> {
  if (context.signal?.aborted) throw new Qcow2Error(ErrorCodes.ABORTED, 'the demo was interrupted', { cause: context.signal.reason });
  const start = performance.now();
  const outcome = await step.run(context);
  const seconds = (performance.now() - start) / 1000;
  return { figures: outcome.figures, title: step.title, command: step.command, seconds, bytes: outcome.bytes, bytesLabel: step.bytesLabel };
}

function asError(error: unknown): Qcow2Error {
  if (error instanceof Qcow2Error) return error;
  const code = (error as { code?: unknown } | undefined)?.code;
  const message = error instanceof Error ? error.message : String(error);
  return new Qcow2Error(typeof code === 'string' ? code : 'EIO', message, { cause: error });
}

// ---- The sample disk -------------------------------------------------------------------------

/**
 * Bytes that look like a disk's: each 4 KiB block starts with a line of text naming its guest
 * offset (compressible) and ends with pseudo-random bytes (not), so compression has something
 * to do and every block is different. `generation` changes the content of a rewrite.
 */
export function sampleBytes(offset: number, length: number, generation: number): Buffer {
  const out = Buffer.alloc(length);
  const words = new Uint32Array(out.buffer, out.byteOffset, Math.floor(length / 4));
  for (let block = 0; block < length; block += 4 * KiB) {
    const line = `qcow2 demo disk, generation ${generation}, guest offset ${offset + block}\n`;
    const half = Math.min(2 * KiB, length - block);
    for (let at = 0; at < half; at += line.length) out.write(line, block + at, Math.min(line.length, half - at), 'latin1');
    let x = ((offset + block) / 4096 + generation * 7919 + 1) >>> 0 || 1;
    for (let w = (block + 2 * KiB) / 4; w < Math.min(words.length, (block + 4 * KiB) / 4); w++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      words[w] = x >>> 0;
    }
  }
  return out;
}

/** Apply `writes` to `image` and flush; returns the bytes written by kind. */
export async function applyWrites(image: Qcow2Image, writes: readonly SampleWrite[], generation: number): Promise<WriteTotals> {
  const totals: WriteTotals = { data: 0, zero: 0, compressed: 0 };
  for (const w of writes) {
    if (w.kind === 'zero') {
      await image.writeZeroes(w.offset, w.length, { unmap: w.unmap });
    } else {
      const data = sampleBytes(w.offset, w.length, generation);
      await (w.kind === 'compressed' ? image.writeCompressed(data, w.offset) : image.write(data, w.offset));
    }
    totals[w.kind] += w.length;
  }
  await image.flush();
  return totals;
}

/** Open a qcow2 image the demo made, with its backing chain (the demo made every file the chain names). */
function openDemoImage(file: string, readOnly: boolean): Promise<Qcow2Image> {
  return openQcow2(file, { readOnly, followFileNames: true });
}

/** Open `file`, run `body` on it, and close it whatever happens. */
async function withImage<T>(file: string, readOnly: boolean, body: (image: Qcow2Image) => Promise<T>): Promise<T> {
  const image = await openDemoImage(file, readOnly);
  try {
    return await body(image);
  } finally {
    await image.close();
  }
}

async function fileSize(file: string): Promise<FileSize> {
  const s = await stat(file);
  return { name: path.basename(file), allocated: s.blocks * 512 };
}

function writtenBytes(totals: WriteTotals): number {
  return totals.data + totals.zero + totals.compressed;
}

async function makeSample(context: DemoContext): Promise<StepOutcome> {
  const base = context.file('base');
  const overlay = context.file('overlay');
  await create(base, { format: 'qcow2', size: SAMPLE_SIZE, clusterSize: SAMPLE_CLUSTER_SIZE });
  const baseWrites = await withImage(base, false, (image) => applyWrites(image, BASE_WRITES, 1));
  // The overlay records its backing file by a name relative to its own folder, so the kept files can be moved together.
  await create(overlay, { format: 'qcow2', backingFile: DEMO_FILES.base, backingFormat: 'qcow2' });
  const overlayWrites = await withImage(overlay, false, (image) => applyWrites(image, OVERLAY_WRITES, 2));
  const files = [await fileSize(base), await fileSize(overlay)];
  const figures: StepFigures = {
    step: 'sample',
    size: SAMPLE_SIZE,
    clusterSize: SAMPLE_CLUSTER_SIZE,
    base: baseWrites,
    overlay: overlayWrites,
    files,
  };
  return { figures, bytes: writtenBytes(baseWrites) + writtenBytes(overlayWrites) };
}

// ---- Looking at the disk ---------------------------------------------------------------------

async function describeChain(context: DemoContext): Promise<StepOutcome> {
  const chain = await infoChain(context.file('overlay'));
  return { figures: { step: 'info', chain }, bytes: 0 };
}

/** Tally the extents of `image` by the layer that supplies them. */
export async function allocationByLayer(image: Image, names: readonly string[]): Promise<{ layers: LayerAllocation[]; unallocated: number; extents: number }> {
  const layers = new Map<number, LayerAllocation>();
  let unallocated = 0;
  let extents = 0;
  for await (const extent of image.extents()) {
    extents++;
    if (extent.kind === 'unallocated') {
      unallocated += extent.length;
      continue;
    }
    let layer = layers.get(extent.depth);
    if (!layer) {
      layer = { depth: extent.depth, name: names[extent.depth] ?? `depth ${extent.depth}`, data: 0, compressed: 0, zero: 0, extents: 0 };
      layers.set(extent.depth, layer);
    }
    layer.extents++;
    if (extent.kind === 'zero') layer.zero += extent.length;
    else layer.data += extent.length;
    if (extent.compressed) layer.compressed += extent.length;
  }
  return { layers: [...layers.values()].sort((a, b) => a.depth - b.depth), unallocated, extents };
}

async function mapAllocation(context: DemoContext): Promise<StepOutcome> {
  const names = [DEMO_FILES.overlay, DEMO_FILES.base];
  return withImage(context.file('overlay'), true, async (image) => {
    const map = await allocationByLayer(image, names);
    return { figures: { step: 'map', size: image.size, ...map }, bytes: image.size };
  });
}

// ---- Backups ---------------------------------------------------------------------------------

/** Convert `source` (its whole chain) into a compressed qcow2 `target`, optionally on a backing file; returns the bytes copied. */
async function compressedCopy(context: DemoContext, source: string, target: string, backing?: string): Promise<number> {
  let copied = 0;
  const input: Image = await open(source, { readOnly: true, followFileNames: true });
  try {
    await convert(input, target, {
      outputFormat: 'qcow2',
      qcow2: { compress: true, create: backing === undefined ? {} : { backingFile: backing, backingFormat: 'qcow2' } },
      signal: context.signal,
      onProgress: (done, total) => {
        copied = done;
        context.onProgress?.(done, total);
      },
    });
  } finally {
    await input.close();
  }
  return copied;
}

/** Data bytes the whole chain of `file` supplies (what a full backup must copy). */
async function chainData(file: string): Promise<number> {
  return withImage(file, true, async (image) => {
    const { layers } = await allocationByLayer(image, []);
    return layers.reduce((sum, layer) => sum + layer.data, 0);
  });
}

async function fullBackup(context: DemoContext): Promise<StepOutcome> {
  const copied = await compressedCopy(context, context.file('overlay'), context.file('backup'));
  const figures: StepFigures = {
    step: 'backup',
    copied,
    file: await fileSize(context.file('backup')),
    chainAllocated: await chainData(context.file('overlay')),
  };
  return { figures, bytes: copied };
}

/** Fail the step unless `result` says the images are identical. */
function requireIdentical(result: CompareResult, names: [string, string]): void {
  if (result.identical) return;
  const where = result.offset === undefined ? result.verdict : `${result.verdict} at offset ${result.offset}`;
  throw new Qcow2Error(ErrorCodes.CORRUPT, `${names[0]} and ${names[1]} differ (${where})`);
}

/** Compare the disks of two images (each with its chain); fails unless identical. */
async function compareFiles(context: DemoContext, a: string, b: string): Promise<CompareResult> {
  const names: [string, string] = [path.basename(a), path.basename(b)];
  return withImage(a, true, (imageA) =>
    withImage(b, true, async (imageB) => {
      const result = await compareImages(imageA, imageB, { signal: context.signal, onProgress: context.onProgress });
      requireIdentical(result, names);
      return result;
    }),
  );
}

async function compareBackup(context: DemoContext): Promise<StepOutcome> {
  const result = await compareFiles(context, context.file('overlay'), context.file('backup'));
  return { figures: { step: 'compare', names: [F.overlay, F.backup], result }, bytes: SAMPLE_SIZE };
}

async function writeChanges(context: DemoContext): Promise<StepOutcome> {
  const top = context.file('top');
  await create(top, { format: 'qcow2', backingFile: DEMO_FILES.overlay, backingFormat: 'qcow2' });
  const written = await withImage(top, false, (image) => applyWrites(image, LATER_WRITES, 3));
  return { figures: { step: 'changes', written, file: await fileSize(top) }, bytes: writtenBytes(written) };
}

async function incrementalBackup(context: DemoContext): Promise<StepOutcome> {
  const copied = await compressedCopy(context, context.file('top'), context.file('incremental'), DEMO_FILES.backup);
  return { figures: { step: 'incremental', copied, file: await fileSize(context.file('incremental')) }, bytes: copied };
}

// ---- Checks ----------------------------------------------------------------------------------

async function checkBackup(context: DemoContext): Promise<StepOutcome> {
  const file = context.file('backup');
  const result = await checkClean(file);
  return { figures: { step: 'check', name: DEMO_FILES.backup, result }, bytes: (await stat(file)).size };
}

async function verifyIncremental(context: DemoContext): Promise<StepOutcome> {
  const check = await checkClean(context.file('incremental'));
  const compare = await compareFiles(context, context.file('top'), context.file('incremental'));
  return { figures: { step: 'verify', check, compare, names: [F.top, F.incremental] }, bytes: SAMPLE_SIZE };
}

/** Check an image as `qcow2 check` does; fails the step unless it is clean. */
async function checkClean(file: string): Promise<CheckFigures> {
  const result = await check(file);
  const figures: CheckFigures = {
    clean: checkExitCode(result) === 0,
    corruptions: result.corruptions,
    leaks: result.leaks,
    checkErrors: result.checkErrors,
    allocatedClusters: result.allocatedClusters,
    compressedClusters: result.compressedClusters,
    imageEndOffset: result.imageEndOffset,
    messages: result.messages,
  };
  if (!figures.clean) {
    const stopped = result.failure === undefined ? '' : `check failed: ${result.failure}; `;
    const problems = `${stopped}${result.corruptions} corruptions, ${result.leaks} leaked clusters, ${result.checkErrors} check errors`;
    throw new Qcow2Error(ErrorCodes.CORRUPT, `${path.basename(file)} is not clean: ${problems}\n${result.messages.join('\n')}`);
  }
  return figures;
}
