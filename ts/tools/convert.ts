/** Copying an image into another (library side of `qcow2 convert`): sparse, parallel, bounded memory. */
import { stat } from 'node:fs/promises';

import { ErrorCodes, Qcow2Error, asQcow2Error, check, settle } from '../errors.js';
import type { Image, ImageFormat } from '../image.js';
import { CacheMode, allocAligned, native } from '../native.js';
import { open } from '../open.js';
import { RawImage } from '../raw.js';
import { Qcow2TargetOptions, convertToQcow2 } from './convert-qcow2.js';

/** Largest piece read or written by one request: bounds memory to `parallel` × this. */
export const COPY_CHUNK = 2 << 20;

/** Zeros between two data runs of a piece up to which both are read with one request (the gap is memset, not read). */
const READ_GAP = 256 << 10;

/**
 * Compressed data is read in requests of at most this many bytes, so that the clusters of one
 * piece inflate on several worker threads at once rather than one after the other on one.
 */
const COMPRESSED_READ = 256 << 10;

/** Granule of zero detection inside data: the usual file system block. */
const ZERO_GRANULE = 4096;

/** How many requests may be in flight at most. */
export const MAX_PARALLEL = 32;

/** How copyImage copies: parallelism, write order, sparseness, and progress. */
export interface CopyOptions {
  /** Requests in flight (1..32, default 8). */
  parallel?: number;
  /** Let writes land out of guest order (qemu-img -W); faster on some storage. */
  outOfOrder?: boolean;
  /**
   * Zero runs of at least this many bytes inside data are not written (qemu-img -S, default
   * 4096, a multiple of 512). 0 writes every byte, zeroes included: the target is fully allocated.
   */
  sparseSize?: number;
  /** The target already reads as zero everywhere (it was just created, or the caller says so). */
  targetIsZero?: boolean;
  /** Where the source's first byte lands in the target (default 0). */
  targetOffset?: number;
  signal?: AbortSignal;
  /** Called as data is copied: `done` of `total` bytes that must be written. */
  onProgress?: (done: number, total: number) => void;
}

/** convert's options: the copy's, plus how source and target are opened or created. */
export interface ConvertOptions extends Omit<CopyOptions, 'targetIsZero' | 'targetOffset'> {
  /** Source format (probed when left out). */
  format?: ImageFormat;
  /** Target format: 'raw' (default) or 'qcow2'. */
  outputFormat?: ImageFormat;
  /** How a qcow2 target is created and written (compression). */
  qcow2?: Qcow2TargetOptions;
  /** Host cache of the source (qemu-img -T; default 'writeback'). */
  sourceCache?: CacheMode;
  /** Host cache of the target (qemu-img -t; default 'unsafe': no flush to disk). */
  targetCache?: CacheMode;
  /** Write into an existing target instead of creating it (qemu-img -n). */
  skipCreate?: boolean;
  /** With skipCreate: the existing target reads as zero, so zero runs need no writes. */
  targetIsZero?: boolean;
  /** Follow the backing and data file names the source records (default false; the CLI sets it). */
  followFileNames?: boolean;
}

/** A stretch of a piece, relative to its start: data to copy, or a run known to read as zero. */
interface Run {
  start: number;
  end: number;
  data: boolean;
  /** Data stored compressed in the source. */
  compressed?: boolean;
}

/**
 * One piece of work, in guest order: a window of at most COPY_CHUNK bytes read with one
 * request, whose runs say what to write; or, without data, one zero run of any length.
 */
interface Piece {
  offset: number;
  length: number;
  runs: Run[];
  /** Bytes of data runs: what -p counts. */
  dataBytes: number;
  /** Settles when the piece before it has been written (in-order mode only). */
  previous: Promise<void>;
  /** Settle once this piece is written, or failed. */
  done: () => void;
}

/**
 * Convert `source` into a new or existing raw or qcow2 image at `target`. Several sources are
 * concatenated, as qemu-img does. Paths are opened (and closed) here; open images stay the
 * caller's.
 */
export async function convert(
  source: string | Image | ReadonlyArray<string | Image>,
  target: string,
  options: ConvertOptions = {},
): Promise<void> {
  const outputFormat = options.outputFormat ?? 'raw';
  check(outputFormat === 'raw' || outputFormat === 'qcow2', `convert: unknown output format '${outputFormat as string}' (raw, qcow2)`);
  check(!options.targetIsZero || options.skipCreate === true, 'convert: targetIsZero needs skipCreate (-n)');
  checkCopyOptions(options);
  const sources = typeof source === 'string' || !Array.isArray(source) ? [source as string | Image] : source;
  check(sources.length > 0, 'convert: at least one source is needed');
  const owned: Image[] = [];
  try {
    const inputs: Image[] = [];
    for (const item of sources) {
      const input = typeof item === 'string' ? await openSource(item, options) : item;
      if (input !== item) owned.push(input);
      inputs.push(input);
      await refuseSameFile(input.path, target);
    }
    const size = inputs.reduce((sum, input) => sum + input.size, 0);
    if (outputFormat === 'qcow2') return await convertToQcow2(inputs, target, size, options);
    const output = options.skipCreate
      ? await openExistingRaw(target, size, options.targetCache)
      : await createRaw(target, size, options.targetCache);
    try {
      await copyAll(inputs, output, { ...options, targetIsZero: options.skipCreate ? options.targetIsZero : true });
      await output.flush();
    } finally {
      await output.close();
    }
  } finally {
    for (const input of owned) await input.close();
  }
}

/** Copy `inputs` one after the other into `output`, with one progress count over all of them. */
async function copyAll(inputs: Image[], output: Image, options: CopyOptions): Promise<void> {
  const onProgress = options.onProgress;
  const sparseSize = options.sparseSize ?? 4096;
  const totals = await Promise.all(inputs.map((input) => (onProgress ? bytesToWrite(input, sparseSize) : 0)));
  const total = totals.reduce((sum, n) => sum + n, 0);
  let before = 0;
  let targetOffset = 0;
  for (const [i, input] of inputs.entries()) {
    const progress = onProgress && ((done: number) => onProgress(before + done, total));
    await copyRange(input, output, { ...options, targetOffset, onProgress: progress }, totals[i]);
    before += totals[i];
    targetOffset += input.size;
  }
}

function openSource(path: string, options: ConvertOptions): Promise<Image> {
  return open(path, {
    readOnly: true,
    format: options.format,
    cache: options.sourceCache ?? 'writeback',
    followFileNames: options.followFileNames ?? false,
  });
}

/** Creating the target would empty the source when both name one file (qemu-img's locks refuse it too). */
async function refuseSameFile(sourcePath: string, targetPath: string): Promise<void> {
  const [a, b] = await Promise.all([stat(sourcePath).catch(() => undefined), stat(targetPath).catch(() => undefined)]);
  if (a && b && a.dev === b.dev && a.ino === b.ino) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `convert: target '${targetPath}' is the source image '${sourcePath}'`);
  }
}

/** Create (or truncate) `path` as a raw image of `size` bytes that reads as zero. */
async function createRaw(path: string, size: number, cache: CacheMode = 'unsafe'): Promise<RawImage> {
  const file = await settle(native.NativeFile.open(path, { writable: true, create: true, cache }));
  try {
    // Emptying first drops the old blocks, so the new image is one hole.
    await settle(file.truncate(0));
    await settle(file.truncate(size));
  } catch (error) {
    await file.close();
    throw error;
  }
  return RawImage.fromFile(path, file);
}

/** Open an existing raw target, which must hold at least `size` bytes. */
async function openExistingRaw(path: string, size: number, cache: CacheMode = 'unsafe'): Promise<RawImage> {
  let image: RawImage;
  try {
    image = await RawImage.open(path, { cache });
  } catch (error) {
    const cause = asQcow2Error(error);
    throw new Qcow2Error(cause.code, `Could not open '${path}': ${cause.message}`, { cause });
  }
  if (image.size < size) {
    await image.close();
    throw new Qcow2Error(
      ErrorCodes.INVALID_ARGUMENT,
      `output file is smaller than input file (${image.size} < ${size} bytes)`,
    );
  }
  return image;
}

function checkCopyOptions(options: CopyOptions): void {
  const parallel = options.parallel ?? 8;
  check(
    Number.isSafeInteger(parallel) && parallel >= 1 && parallel <= MAX_PARALLEL,
    `parallel must be an integer from 1 to ${MAX_PARALLEL}, got ${parallel}`,
  );
  const sparse = options.sparseSize ?? 4096;
  check(
    Number.isSafeInteger(sparse) && sparse >= 0 && sparse % 512 === 0 && sparse <= 16 << 20,
    `sparseSize must be a multiple of 512 from 0 to 16777216, got ${sparse}`,
  );
}

/**
 * Copy every guest byte of `source` into `target` (which must be at least as large): data is
 * read and written in pieces of at most 2 MiB, `parallel` at a time; zero runs are skipped
 * when the target reads as zero already, else zeroed without writing buffers.
 */
export async function copyImage(source: Image, target: Image, options: CopyOptions = {}): Promise<void> {
  checkCopyOptions(options);
  const total = options.onProgress ? await bytesToWrite(source, options.sparseSize ?? 4096) : 0;
  await copyRange(source, target, options, total);
}

/** copyImage, with the progress total (the bytes to write) already counted. */
async function copyRange(source: Image, target: Image, options: CopyOptions, total: number): Promise<void> {
  const shift = options.targetOffset ?? 0;
  check(Number.isSafeInteger(shift) && shift >= 0, `targetOffset must be a non-negative integer, got ${shift}`);
  check(
    target.size >= shift + source.size,
    `copyImage: target (${target.size} bytes) is smaller than ${shift} + source (${source.size} bytes)`,
  );
  const parallel = options.parallel ?? 8;
  const sparseSize = options.sparseSize ?? 4096;
  // With -S 0 the target is fully allocated, so zero runs are written even on a zeroed target.
  const skipZeroes = options.targetIsZero === true && sparseSize > 0;
  let done = 0;
  const report = (length: number) => {
    done += length;
    options.onProgress?.(done, total);
  };
  options.onProgress?.(0, total);
  const pieces = splitIntoPieces(source, options);
  let failure: Qcow2Error | undefined;
  const bufferSize = bufferSizeFor(source.size, COPY_CHUNK);
  const worker = async () => {
    const buffer = allocAligned(bufferSize);
    while (!failure) {
      let next: Piece | undefined;
      try {
        next = await nextPiece(pieces);
      } catch (error) {
        failure ??= asQcow2Error(error);
        return;
      }
      if (!next) return;
      try {
        await copyPiece(source, target, next, buffer, { skipZeroes, sparseSize, inOrder: !options.outOfOrder, shift });
        report(sparseSize === 0 ? next.length : next.dataBytes);
      } catch (error) {
        failure ??= asQcow2Error(error);
      } finally {
        next.done();
      }
    }
  };
  await Promise.all(Array.from({ length: parallel }, worker));
  await pieces.return(undefined);
  if (failure) throw failure;
}

/** A buffer for pieces of at most `chunk` bytes of a disk of `size` bytes: small disks need less. */
export function bufferSizeFor(size: number, chunk: number): number {
  return Math.min(chunk, Math.max(4096, Math.ceil(size / 4096) * 4096));
}

/** Take the next piece; a failure of the source (extents) is a failure of the copy. */
async function nextPiece(pieces: AsyncGenerator<Piece>): Promise<Piece | undefined> {
  const { value, done } = await pieces.next();
  return done ? undefined : value;
}

function checkAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new Qcow2Error(ErrorCodes.ABORTED, 'the operation was aborted', { cause: signal.reason });
}

/** Bytes a copy writes: data, and with sparseSize 0 zero runs too (what qemu-img -p counts). */
async function bytesToWrite(source: Image, sparseSize: number): Promise<number> {
  let total = 0;
  for await (const extent of source.extents()) {
    if (extent.kind === 'data' || sparseSize === 0) total += extent.length;
  }
  return total;
}

/**
 * The source's extents gathered into pieces: data, and the zero runs between data, fill
 * windows of COPY_CHUNK bytes aligned in guest offsets (aligned requests suit O_DIRECT, and
 * many small extents cost one read); zero runs outside any window go as one request each.
 */
async function* splitIntoPieces(source: Image, options: CopyOptions): AsyncGenerator<Piece> {
  let previous: Promise<void> = Promise.resolve();
  let pending: { offset: number; windowEnd: number; runs: Run[]; dataBytes: number } | undefined;
  const close = (): Piece => {
    const { offset, runs, dataBytes } = pending!;
    pending = undefined;
    let done!: () => void;
    const written = new Promise<void>((resolve) => (done = resolve));
    const piece = { offset, length: runs[runs.length - 1].end, runs, dataBytes, previous, done };
    previous = written;
    return piece;
  };
  for await (const extent of source.extents()) {
    const data = extent.kind === 'data';
    const compressed = extent.compressed === true;
    const end = extent.offset + extent.length;
    for (let pos = extent.offset; pos < end; ) {
      checkAborted(options.signal);
      if (!pending && !data) {
        pending = { offset: pos, windowEnd: end, runs: [], dataBytes: 0 };
      } else if (!pending) {
        pending = { offset: pos, windowEnd: pos - (pos % COPY_CHUNK) + COPY_CHUNK, runs: [], dataBytes: 0 };
      }
      const stop = Math.min(end, pending.windowEnd);
      pending.runs.push({ start: pos - pending.offset, end: stop - pending.offset, data, compressed });
      if (data) pending.dataBytes += stop - pos;
      pos = stop;
      if (pos === pending.windowEnd) yield close();
    }
  }
  if (pending) yield close();
}

interface PieceContext {
  skipZeroes: boolean;
  sparseSize: number;
  inOrder: boolean;
  /** Target offset minus source offset. */
  shift: number;
}

async function copyPiece(source: Image, target: Image, piece: Piece, buffer: Buffer, ctx: PieceContext): Promise<void> {
  // Zero runs after the last data run need no bytes.
  const readEnd = piece.runs.reduce((end, run) => (run.data ? run.end : end), 0);
  const view = buffer.subarray(0, readEnd);
  await whenAllSettled(readRequests(piece.runs).map(([start, end]) => source.read(view.subarray(start, end), piece.offset + start)));
  if (ctx.inOrder) await piece.previous;
  // The writes of one piece never overlap: all of them go out at once.
  const writes: Array<Promise<void>> = [];
  for (const run of piece.runs) {
    const offset = piece.offset + run.start + ctx.shift;
    if (!run.data) {
      if (!ctx.skipZeroes) writes.push(target.writeZeroes(offset, run.end - run.start, { unmap: ctx.sparseSize > 0 }));
    } else if (ctx.sparseSize === 0) {
      writes.push(target.write(view.subarray(run.start, run.end), offset));
    } else {
      writes.push(...writeDataRun(target, view.subarray(run.start, run.end), offset, ctx));
    }
  }
  await whenAllSettled(writes);
}

/**
 * The reads that fetch the data runs of a piece, as [start, end) in the piece, all issued at once:
 * runs close together share one request, long zero gaps are not read, and compressed data is
 * split so that its clusters inflate in parallel.
 */
function readRequests(runs: Run[]): Array<[number, number]> {
  const spans: Array<[number, number, boolean]> = [];
  for (const run of runs) {
    if (!run.data) continue;
    const last = spans[spans.length - 1];
    if (last && run.start - last[1] <= READ_GAP) {
      last[1] = run.end;
      last[2] ||= run.compressed === true;
    } else {
      spans.push([run.start, run.end, run.compressed === true]);
    }
  }
  const requests: Array<[number, number]> = [];
  for (const [start, end, compressed] of spans) {
    const step = compressed ? COMPRESSED_READ : end - start;
    for (let at = start; at < end; at += step) requests.push([at, Math.min(end, at + step)]);
  }
  return requests;
}

/** Wait for every request, not just the first failure (the buffer must be free when this returns); then throw the first failure. */
async function whenAllSettled(requests: Array<Promise<void>>): Promise<void> {
  const failed = (await Promise.allSettled(requests)).find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}

/** Write a data run, leaving out (or zeroing) the zero stretches of at least sparseSize bytes in it. */
function writeDataRun(target: Image, data: Buffer, offset: number, ctx: PieceContext): Array<Promise<void>> {
  return dataAndZeroRuns(data, offset, ctx.sparseSize).flatMap((run) => {
    if (run.data) return [target.write(data.subarray(run.start, run.end), offset + run.start)];
    if (ctx.skipZeroes) return [];
    return [target.writeZeroes(offset + run.start, run.end - run.start, { unmap: true })];
  });
}

/**
 * Split `buffer` (guest bytes from `offset`) into runs to write and zero runs of at least
 * `minZero` bytes to leave out; zero detection works on 4 KiB granules aligned in guest offsets.
 */
export function dataAndZeroRuns(
  buffer: Buffer,
  offset: number,
  minZero: number,
): Array<{ start: number; end: number; data: boolean }> {
  const granule = Math.min(ZERO_GRANULE, minZero);
  const runs: Array<{ start: number; end: number; data: boolean }> = [];
  let zeroStart = -1;
  let dataStart = 0;
  const closeZeroRun = (at: number) => {
    if (zeroStart >= 0 && at - zeroStart >= minZero) {
      if (zeroStart > dataStart) runs.push({ start: dataStart, end: zeroStart, data: true });
      runs.push({ start: zeroStart, end: at, data: false });
      dataStart = at;
    }
    zeroStart = -1;
  };
  for (let pos = 0; pos < buffer.length; ) {
    const end = Math.min(buffer.length, pos + granule - ((offset + pos) % granule));
    if (isZero(buffer, pos, end)) {
      if (zeroStart < 0) zeroStart = pos;
    } else {
      closeZeroRun(pos);
    }
    pos = end;
  }
  closeZeroRun(buffer.length);
  if (dataStart < buffer.length) runs.push({ start: dataStart, end: buffer.length, data: true });
  return runs;
}

const ZEROES = Buffer.alloc(ZERO_GRANULE);

function isZero(buffer: Buffer, start: number, end: number): boolean {
  return buffer.compare(ZEROES, 0, end - start, start, end) === 0;
}
