/**
 * convert's qcow2 target (`qcow2 convert -O qcow2`): the image is created from -o/-B/-F, then
 * only what reads as non-zero is written, compressed with -c; `parallel` requests at a time.
 */
import { ErrorCodes, Qcow2Error, asQcow2Error, check } from '../errors.js';
import type { Image } from '../image.js';
import { CacheMode, allocAligned } from '../native.js';
import { readHeader } from '../qcow2/header.js';
import { Qcow2Image } from '../qcow2/image.js';
import { errnoText } from '../qcow2/metadata-file.js';
import { openQcow2 } from '../qcow2/open.js';
import type { ConvertOptions } from './convert.js';
import { COPY_CHUNK, dataAndZeroRuns } from './convert.js';
import { combineFileName } from '../qcow2/text.js';
import { CreateOptions, create } from './create.js';

/** How the qcow2 target is made: creation options (qemu-img -o, -B, -F) and compression (-c). */
export interface Qcow2TargetOptions {
  /** Creation options; the size is always the sources' total. */
  create?: Omit<CreateOptions, 'format' | 'size' | 'skipBackingCheck'>;
  /** Store every cluster compressed (zlib, or zstd when the image's compression type says so). */
  compress?: boolean;
}

/** What to do with a stretch of the target. */
const enum Action {
  /** Read from the sources and write. */
  Copy,
  /** Make it read as zero. */
  Zero,
  /** Leave it as it is: it reads right already (zero on a new image, or from the target's backing file). */
  Skip,
}

/** A stretch of target offsets and what it needs. */
interface Span {
  offset: number;
  end: number;
  action: Action;
}

/** A window of target offsets (aligned to COPY_CHUNK) and its spans, handed to one worker. */
interface Window {
  offset: number;
  spans: Span[];
  /** Settles when the window before it has issued its last write (in-order mode). */
  previous: Promise<void>;
  /** Lets the next window write; called once this window's last write is issued (again when it ends: harmless). */
  done: () => void;
}

/** One source and where its first byte lands in the target. */
interface Segment {
  image: Image;
  start: number;
}

/** How the copy into the qcow2 target behaves, resolved once. */
interface CopyPlan {
  segments: Segment[];
  target: Qcow2Image;
  clusterSize: number;
  /** Zero stretches need no write: the target reads as zero wherever it is not written. */
  zeroInit: boolean;
  /** The target has a backing file: what the sources' top layers leave unallocated stays unallocated. */
  keepUnallocated: boolean;
  compress: boolean;
  sparseSize: number;
  /** Bytes per window, a multiple of COPY_CHUNK (so of every cluster size). */
  windowBytes: number;
  inOrder: boolean;
  parallel: number;
  signal?: AbortSignal;
  onProgress?: (done: number, total: number) => void;
}

/**
 * Windows of a copy without compression: large, so that a window's data moves in few large requests,
 * and the engine allocates its clusters in one piece (windows allocating at once may swap places in
 * the target; the fewer the windows, the closer the target stays to guest order). A multiple of
 * COPY_CHUNK, written out: convert.js and this module import each other.
 */
const PLAIN_WINDOW = 8 << 20;
/** Data spans of a window closer than this are read with one request, the gap between them with it. */
const READ_GAP = 256 << 10;

/**
 * Write `inputs` (concatenated, `size` bytes in all) into the qcow2 image `target`, created
 * here unless options.skipCreate. The inputs stay open; the target is closed when done.
 */
export async function convertToQcow2(inputs: Image[], target: string, size: number, options: ConvertOptions): Promise<void> {
  const qcow2 = options.qcow2 ?? {};
  if (options.skipCreate) {
    check(qcow2.create === undefined, 'convert: creation options have no effect when skipping image creation (skipCreate)');
  } else {
    await createTarget(target, size, qcow2.create ?? {});
  }
  const image = await openTarget(target, options.targetCache);
  try {
    if (image.size < size) {
      throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `output file is smaller than input file (${image.size} < ${size} bytes)`);
    }
    const hasBacking = image.header.backingFile !== undefined;
    await copyToQcow2({
      segments: segmentsOf(inputs),
      target: image,
      clusterSize: image.header.clusterSize,
      zeroInit: options.skipCreate ? options.targetIsZero === true : !hasBacking,
      keepUnallocated: hasBacking,
      compress: qcow2.compress ?? false,
      sparseSize: options.sparseSize ?? 4096,
      windowBytes: (qcow2.compress ?? false) ? COPY_CHUNK : PLAIN_WINDOW,
      inOrder: !options.outOfOrder,
      parallel: options.parallel ?? 8,
      signal: options.signal,
      onProgress: options.onProgress,
    });
    await image.flush();
  } finally {
    await image.close();
  }
}

/** Create the target; a failure reads "TARGET: error while converting qcow2: REASON", as in qemu-img. */
async function createTarget(target: string, size: number, options: Qcow2TargetOptions['create'] & object): Promise<void> {
  try {
    await create(target, { ...options, format: 'qcow2', size, skipBackingCheck: true });
  } catch (error) {
    const cause = asQcow2Error(error);
    throw new Qcow2Error(cause.code, `${target}: error while converting qcow2: ${cause.message}`, { cause });
  }
}

/** Open the target writable with its backing chain (writes into unallocated clusters copy from it). */
async function openTarget(target: string, cache: CacheMode = 'unsafe'): Promise<Qcow2Image> {
  try {
    return await openQcow2(target, { readOnly: false, followFileNames: true, cache, backingCache: 'writeback' });
  } catch (error) {
    const cause = asQcow2Error(error);
    const reason = isErrno(cause.code) ? await openFailureReason(target, cause) : cause.message;
    throw new Qcow2Error(cause.code, `Could not open '${target}': ${reason}`, { cause });
  }
}

function isErrno(code: string): boolean {
  return /^E[A-Z0-9]+$/.test(code);
}

/** A system error opening the target, told as qemu-img tells it: the backing file, or the target itself, could not be opened. */
async function openFailureReason(target: string, cause: Qcow2Error): Promise<string> {
  const text = errnoText(cause).text;
  const backing = await readHeader(target).then(
    ({ header }) => header.backingFile,
    () => undefined,
  );
  if (backing === undefined) return `Could not open '${target}': ${text}`;
  return `Could not open backing file: Could not open '${combineFileName(target, backing)}': ${text}`;
}

function segmentsOf(inputs: Image[]): Segment[] {
  let start = 0;
  return inputs.map((image) => {
    const segment = { image, start };
    start += image.size;
    return segment;
  });
}

/** Copy the plan's sources into its target: windows of COPY_CHUNK bytes, `parallel` at a time. */
async function copyToQcow2(plan: CopyPlan): Promise<void> {
  const total = plan.onProgress ? await bytesToCopy(plan) : 0;
  let done = 0;
  plan.onProgress?.(0, total);
  const windows = windowsOf(plan);
  let failure: Qcow2Error | undefined;
  const worker = async () => {
    const buffer = allocAligned(plan.windowBytes);
    while (!failure) {
      let next: IteratorResult<Window>;
      try {
        next = await windows.next();
      } catch (error) {
        failure ??= asQcow2Error(error);
        return;
      }
      if (next.done) return;
      const window = next.value;
      try {
        await copyWindow(plan, window, buffer);
        done += copyBytes(window.spans);
        plan.onProgress?.(done, total);
      } catch (error) {
        failure ??= asQcow2Error(error);
      } finally {
        window.done();
      }
    }
  };
  await Promise.all(Array.from({ length: plan.parallel }, worker));
  await windows.return(undefined);
  if (failure) throw failure;
}

function copyBytes(spans: Span[]): number {
  return spans.reduce((sum, span) => sum + (span.action === Action.Copy ? span.end - span.offset : 0), 0);
}

/** Bytes to copy over all the sources: what progress counts. */
async function bytesToCopy(plan: CopyPlan): Promise<number> {
  let total = 0;
  for await (const span of spansOf(plan)) if (span.action === Action.Copy) total += span.end - span.offset;
  return total;
}

/** What each stretch of the target needs, from the sources' extents, in target offsets. */
async function* spansOf(plan: CopyPlan): AsyncGenerator<Span> {
  for (const { image, start } of plan.segments) {
    for await (const extent of image.extents()) {
      const offset = start + extent.offset;
      yield { offset, end: offset + extent.length, action: actionOf(plan, extent.kind, extent.depth) };
    }
  }
}

/**
 * With a backing file on the target, only the sources' top layers are written (qemu-img -B):
 * what they leave unallocated is read from the backing file. Zeroes need a write only when
 * the target does not read as zero already.
 */
function actionOf(plan: CopyPlan, kind: 'data' | 'zero' | 'unallocated', depth: number): Action {
  if (plan.keepUnallocated && (kind === 'unallocated' || depth > 0)) return Action.Skip;
  if (kind === 'data') return Action.Copy;
  return plan.zeroInit && plan.sparseSize > 0 ? Action.Skip : Action.Zero;
}

/** The spans cut at COPY_CHUNK boundaries and gathered per window, in order; windows with nothing to do are left out. */
async function* windowsOf(plan: CopyPlan): AsyncGenerator<Window> {
  let previous: Promise<void> = Promise.resolve();
  let pending: { offset: number; spans: Span[] } | undefined;
  const close = (): Window => {
    const { offset, spans } = pending!;
    pending = undefined;
    let done!: () => void;
    const written = new Promise<void>((resolve) => (done = resolve));
    const window = { offset, spans, previous, done };
    previous = written;
    return window;
  };
  for await (const span of spansOf(plan)) {
    checkAborted(plan.signal);
    for (let pos = span.offset; pos < span.end; ) {
      const windowStart = pos - (pos % plan.windowBytes);
      if (pending && pending.offset !== windowStart) yield close();
      const stop = Math.min(span.end, windowStart + plan.windowBytes);
      if (span.action !== Action.Skip) {
        pending ??= { offset: windowStart, spans: [] };
        pending.spans.push({ offset: pos, end: stop, action: span.action });
      }
      pos = stop;
    }
  }
  if (pending) yield close();
}

function checkAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new Qcow2Error(ErrorCodes.ABORTED, 'the operation was aborted', { cause: signal.reason });
}

/** A write not started yet: a window's writes run one after the other. */
type Write = () => Promise<void>;

/**
 * Write one window: its read first, then (in order, when asked) its writes, one after the
 * other, since several of them may fall in one cluster.
 */
async function copyWindow(plan: CopyPlan, window: Window, buffer: Buffer): Promise<void> {
  const copies = window.spans.filter((span) => span.action === Action.Copy);
  const zeroes = window.spans.filter((span) => span.action === Action.Zero);
  const writes: Write[] = [];
  if (copies.length === 0) {
    for (const span of zeroes) writes.push(() => writeZeroes(plan, span.offset, span.end));
  } else {
    // With compression whole clusters are written, so whole clusters are read.
    const first = copies[0].offset;
    const last = copies[copies.length - 1].end;
    const readFrom = plan.compress ? alignDown(first, plan.clusterSize) : first;
    const readTo = plan.compress ? Math.min(alignUp(last, plan.clusterSize), plan.target.size) : last;
    const view = buffer.subarray(0, readTo - readFrom);
    if (plan.compress) await readSources(plan.segments, view, readFrom);
    else await readSpans(plan.segments, copies, view, readFrom);
    if (plan.compress) {
      writes.push(...compressedWrites(plan, copies, view, readFrom));
      for (const span of zeroes) writes.push(...zeroWritesOutside(plan, span, copies));
    } else {
      for (const span of zeroes) writes.push(() => writeZeroes(plan, span.offset, span.end));
      for (const span of copies) writes.push(...dataWrites(plan, view.subarray(span.offset - readFrom, span.end - readFrom), span.offset));
    }
  }
  if (plan.inOrder) await window.previous;
  // Compressed writes cover whole clusters of their own (and the zero writes beside them other
  // clusters): they can all be in flight at once, compressing on several threads.
  if (plan.compress) await writeTogether(writes, window.done);
  else await writeInSequence(writes, window.done);
}

/** Issue all of `writes` at once, `release` the next window, then wait for them all (the buffer is theirs until then). */
async function writeTogether(writes: Write[], release: () => void): Promise<void> {
  const written = writes.map((write) => write());
  release();
  const failed = (await Promise.allSettled(written)).find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}

/**
 * Run `writes` one after the other, and `release` the next window as soon as the last one is
 * issued: windows are whole clusters apart (COPY_CHUNK is a multiple of every cluster size), so
 * only the order in which their writes reach the engine matters (it allocates in about that order,
 * so the target's clusters stay close to guest order), and several windows' writes can be on the
 * disk at once, where waiting for each to land left the disk idle between them.
 */
async function writeInSequence(writes: Write[], release: () => void): Promise<void> {
  if (writes.length === 0) release();
  for (let i = 0; i < writes.length; i++) {
    const written = writes[i]();
    if (i === writes.length - 1) release();
    await written;
  }
}

/** Zero the parts of `span` outside the clusters the copy spans touch: those were written whole already. */
function zeroWritesOutside(plan: CopyPlan, span: Span, copies: Span[]): Write[] {
  const touched = new Set<number>();
  for (const copy of copies) {
    for (let cluster = alignDown(copy.offset, plan.clusterSize); cluster < copy.end; cluster += plan.clusterSize) touched.add(cluster);
  }
  const writes: Write[] = [];
  const zero = (from: number, to: number) => writes.push(() => writeZeroes(plan, from, to));
  let from = span.offset;
  for (let cluster = alignDown(span.offset, plan.clusterSize); cluster < span.end; cluster += plan.clusterSize) {
    if (!touched.has(cluster)) continue;
    if (from < cluster) zero(from, cluster);
    from = Math.min(span.end, cluster + plan.clusterSize);
  }
  if (from < span.end) zero(from, span.end);
  return writes;
}

function writeZeroes(plan: CopyPlan, from: number, to: number): Promise<void> {
  return plan.target.writeZeroes(from, to - from, { unmap: plan.sparseSize > 0 });
}

function alignDown(n: number, alignment: number): number {
  return n - (n % alignment);
}

function alignUp(n: number, alignment: number): number {
  return alignDown(n + alignment - 1, alignment);
}

/** Data at target offset `offset`: written whole, or without its zero stretches when the target reads as zero. */
function dataWrites(plan: CopyPlan, data: Buffer, offset: number): Write[] {
  if (!plan.zeroInit || plan.sparseSize === 0) return [() => plan.target.write(data, offset)];
  return dataAndZeroRuns(data, offset, plan.sparseSize)
    .filter((run) => run.data)
    .map((run) => () => plan.target.write(data.subarray(run.start, run.end), offset + run.start));
}

/**
 * The clusters the copy spans touch (all of them inside `view`, which starts at `viewOffset`),
 * compressed in runs of consecutive non-zero clusters; all-zero clusters are left out on a
 * target that reads as zero, else zeroed.
 */
/** Clusters per compressed write request. */
const COMPRESSED_PIECE_CLUSTERS = 4;

function compressedWrites(plan: CopyPlan, copies: Span[], view: Buffer, viewOffset: number): Write[] {
  const { clusterSize, target } = plan;
  const writes: Write[] = [];
  let runStart = -1;
  let next = -1;
  const flushRun = () => {
    // Runs go in pieces of a few clusters, so that one window's clusters compress on several threads.
    for (let at = runStart; runStart >= 0 && at < next; at += COMPRESSED_PIECE_CLUSTERS * clusterSize) {
      const run = view.subarray(at - viewOffset, Math.min(next, at + COMPRESSED_PIECE_CLUSTERS * clusterSize) - viewOffset);
      const from = at;
      writes.push(() => target.writeCompressed(run, from));
    }
    runStart = -1;
  };
  for (const span of copies) {
    for (let cluster = alignDown(span.offset, clusterSize); cluster < span.end; cluster += clusterSize) {
      if (cluster < next) continue;
      if (cluster !== next) flushRun();
      const end = Math.min(cluster + clusterSize, target.size);
      if (isZero(view, cluster - viewOffset, end - viewOffset)) {
        flushRun();
        if (!plan.zeroInit) writes.push(() => target.writeZeroes(cluster, end - cluster, { unmap: true }));
      } else if (runStart < 0) {
        runStart = cluster;
      }
      next = end;
    }
  }
  flushRun();
  return writes;
}

const ZERO_BLOCK = Buffer.alloc(64 << 10);

function isZero(buffer: Buffer, start: number, end: number): boolean {
  for (let pos = start; pos < end; pos += ZERO_BLOCK.length) {
    const stop = Math.min(end, pos + ZERO_BLOCK.length);
    if (buffer.compare(ZERO_BLOCK, 0, stop - pos, pos, stop) !== 0) return false;
  }
  return true;
}

/**
 * Fill the parts of `view` (target offset `viewOffset` on) that `copies` cover, reading nearby spans
 * together; large gaps are not read (a hole read through would cost transfer time, and a buffered
 * read of it can make the source's later extent queries report it as data).
 */
async function readSpans(segments: Segment[], copies: Span[], view: Buffer, viewOffset: number): Promise<void> {
  const ranges: Array<{ from: number; to: number }> = [];
  for (const { offset, end } of copies) {
    const last = ranges[ranges.length - 1];
    if (last && offset - last.to < READ_GAP) last.to = end;
    else ranges.push({ from: offset, to: end });
  }
  const reads = ranges.map(({ from, to }) => readSources(segments, view.subarray(from - viewOffset, to - viewOffset), from));
  await settleAll(reads);
}

/** Wait for every promise (buffers they fill stay theirs until then), then throw the first failure. */
async function settleAll(promises: Array<Promise<void>>): Promise<void> {
  const failed = (await Promise.allSettled(promises)).find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}

/** Fill `buffer` from target offset `offset` of the concatenated sources; bytes past their end read as zero. */
async function readSources(segments: Segment[], buffer: Buffer, offset: number): Promise<void> {
  const reads: Array<Promise<void>> = [];
  let covered = offset;
  for (const { image, start } of segments) {
    const from = Math.max(offset, start);
    const to = Math.min(offset + buffer.length, start + image.size);
    if (from < to) reads.push(image.read(buffer.subarray(from - offset, to - offset), from - start));
    covered = Math.max(covered, to);
  }
  buffer.fill(0, covered - offset);
  const failed = (await Promise.allSettled(reads)).find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}
