/** Comparing the guest contents of two images (library side of `qcow2 compare`). */
import { ErrorCodes, Qcow2Error, asQcow2Error, check } from '../errors.js';
import type { Extent, Image } from '../image.js';
import { allocAligned } from '../native.js';
import type { Qcow2Header } from '../qcow2/header.js';
import { bufferSizeFor } from './convert.js';
import { mapEntryOf } from './map.js';

/** Largest piece read from each image by one request. */
const COMPARE_CHUNK = 2 << 20;

/** qemu-img reports a mismatch at the start of the 512-byte sector holding the first different byte. */
const SECTOR = 512;

/** How compareImages compares: strict mode, parallelism, abort and progress. */
export interface CompareOptions {
  /**
   * Strict mode (qemu-img compare -s): images of different sizes differ, and so do runs whose
   * allocation status differs (allocated or not, data or zero, placed in the file or not).
   */
  strict?: boolean;
  /** Pieces compared at once (1..32, default 8). */
  parallel?: number;
  signal?: AbortSignal;
  /** Called as the comparison advances: `done` of `total` bytes (the larger image's size). */
  onProgress?: (done: number, total: number) => void;
}

/** Why two images are not identical: contents, size (strict mode), or allocation status (strict mode). */
export type CompareVerdict = 'identical' | 'content' | 'size' | 'status';

/** The verdict of compareImages, with what qemu-img compare prints it from. */
export interface CompareResult {
  identical: boolean;
  verdict: CompareVerdict;
  /** Where the images first differ (content: the start of the first different 512-byte sector). */
  offset?: number;
  /** The two images have different sizes; outside strict mode the longer one's tail must read as zero. */
  sizeMismatch: boolean;
}

/** A failure while comparing: `phase` says whether the allocation status or the data could not be read. */
export class CompareError extends Qcow2Error {
  constructor(
    readonly phase: 'status' | 'read',
    cause: Qcow2Error,
    message: string,
  ) {
    super(cause.code, message, { cause });
  }
}

/** One piece of work: guest bytes [offset, offset + length) to compare; a side that is not read is zero. */
interface Piece {
  /** Position in the sequence of pieces and skipped runs, for progress. */
  index: number;
  offset: number;
  length: number;
  readA: boolean;
  readB: boolean;
}

/** A difference found, at `offset`. */
interface Difference {
  verdict: 'content' | 'status';
  offset: number;
}

/** One image of a backing chain, as far as QEMU's block status answers depend on it. */
interface Layer {
  size: number;
  clusterSize: number;
  /** Guest bytes one block status answer covers at most: a qcow2 L2 table; unbounded for raw. */
  span: number;
}

/** The layers of the backing chain of `image`, top first. */
function chainLayers(image: Image): Layer[] {
  const layers: Layer[] = [];
  for (let layer: Image | undefined = image; layer; layer = (layer as { backing?: Image }).backing) {
    const header = (layer as { header?: Pick<Qcow2Header, 'clusterSize' | 'extendedL2'> }).header;
    if (layer.format === 'qcow2' && header) {
      const entries = header.clusterSize / (header.extendedL2 ? 16 : 8);
      layers.push({ size: layer.size, clusterSize: header.clusterSize, span: entries * header.clusterSize });
    } else {
      layers.push({ size: layer.size, clusterSize: 512, span: Infinity });
    }
  }
  return layers;
}

/**
 * From where in `extent` QEMU's block status carries its end-of-file flag, or undefined when
 * it never does: the run must reach the end of the image (or, unallocated at the bottom of
 * the chain, the end of the bottom file), and the answers of every layer consulted must reach
 * it too, which they only do from the start of their last L2 table (last cluster if compressed).
 */
function eofFrom(layers: Layer[], extent: Extent): number | undefined {
  const end = extent.offset + extent.length;
  const bottom = layers.length - 1;
  const atBottomEnd = extent.kind === 'unallocated' && extent.depth === bottom && end === layers[bottom].size;
  if (end !== layers[0].size && !atBottomEnd) return undefined;
  let from = extent.offset;
  for (let i = 0; i <= Math.min(extent.depth, bottom); i++) {
    const span = extent.compressed && i === extent.depth ? layers[i].clusterSize : layers[i].span;
    if (Number.isFinite(span)) from = Math.max(from, Math.floor((end - 1) / span) * span);
  }
  return from;
}

/**
 * The block status qemu-img compare -s compares at guest offset `at` inside `extent`, as one
 * string: allocated, zero, data, placed in a file, end of file.
 */
function statusKey(image: Image, layers: Layer[], extent: Extent, at: number): string {
  const e = mapEntryOf(image, extent);
  // Unallocated above a backing file means past that file's end: QEMU counts the zeroes it
  // makes up there as allocated.
  const allocated = e.present || (extent.kind === 'unallocated' && extent.depth < layers.length - 1);
  const eofStart = eofFrom(layers, extent);
  const eof = eofStart !== undefined && at >= eofStart;
  return `${allocated}:${e.zero}:${e.data}:${e.offset !== undefined}:${eof}`;
}

/** The first offset in [start, end) where the block status of `ea` (in `a`) and `eb` (in `b`) differ. */
function firstStatusDifference(a: Side, ea: Extent, b: Side, eb: Extent, start: number, end: number): number | undefined {
  const flips = [eofFrom(a.layers, ea), eofFrom(b.layers, eb)].filter((at): at is number => at !== undefined && at > start && at < end);
  for (const at of [start, ...flips.sort((x, y) => x - y)]) {
    if (statusKey(a.image, a.layers, ea, at) !== statusKey(b.image, b.layers, eb, at)) return at;
  }
  return undefined;
}

/** An image and its chain, for status comparisons. */
interface Side {
  image: Image;
  layers: Layer[];
}

/** Wrap the extents of `image` so that their failures are status failures naming the image. */
async function* statusOf(image: Image, offset: number, length: number): AsyncGenerator<Extent> {
  try {
    if (length > 0) yield* image.extents({ offset, length });
  } catch (error) {
    throw new CompareError('status', asQcow2Error(error), `Sector allocation test failed for ${image.path}`);
  }
}

/** Compare the guest contents of `a` and `b` as qemu-img compare does. */
export async function compareImages(a: Image, b: Image, options: CompareOptions = {}): Promise<CompareResult> {
  const parallel = options.parallel ?? 8;
  check(
    Number.isSafeInteger(parallel) && parallel >= 1 && parallel <= 32,
    `parallel must be an integer from 1 to 32, got ${parallel}`,
  );
  const sizeMismatch = a.size !== b.size;
  const total = Math.max(a.size, b.size);
  options.onProgress?.(0, total);
  if (options.strict && sizeMismatch) return { identical: false, verdict: 'size', sizeMismatch };
  const state = new Comparison(total, options);
  await state.run(parallel, pieces(a, b, state, options.strict === true), a, b);
  const first = state.first;
  if (first) return { identical: false, verdict: first.verdict, offset: first.offset, sizeMismatch };
  return { identical: true, verdict: 'identical', sizeMismatch };
}

/**
 * The pieces to compare, in guest order: the common part walked through both images' extents
 * (runs zero in both need no I/O), then the tail of the longer image (only data must be read).
 */
async function* pieces(a: Image, b: Image, state: Comparison, strict: boolean): AsyncGenerator<Piece> {
  const common = Math.min(a.size, b.size);
  const extentsA = statusOf(a, 0, common);
  const extentsB = statusOf(b, 0, common);
  try {
    yield* commonPieces(a, b, extentsA, extentsB, state, strict);
  } finally {
    await Promise.all([extentsA.return(undefined), extentsB.return(undefined)]);
  }
  if (state.first) return;
  const longer = a.size > b.size ? a : b;
  for await (const extent of statusOf(longer, common, longer.size - common)) {
    if (state.stopsBefore(extent.offset)) return;
    const end = extent.offset + extent.length;
    if (extent.kind === 'data') yield* split(state, extent.offset, end, longer === a, longer === b);
    else state.skipped(extent.length);
  }
}

/** The pieces of the part both images have, walking their extents side by side. */
async function* commonPieces(
  a: Image,
  b: Image,
  extentsA: AsyncGenerator<Extent>,
  extentsB: AsyncGenerator<Extent>,
  state: Comparison,
  strict: boolean,
): AsyncGenerator<Piece> {
  const sideA = { image: a, layers: chainLayers(a) };
  const sideB = { image: b, layers: chainLayers(b) };
  let ea = (await extentsA.next()).value as Extent | undefined;
  let eb = (await extentsB.next()).value as Extent | undefined;
  for (let pos = 0; ea && eb && !state.stopsBefore(pos); ) {
    const end = Math.min(ea.offset + ea.length, eb.offset + eb.length);
    const differs = strict ? firstStatusDifference(sideA, ea, sideB, eb, pos, end) : undefined;
    if (differs !== undefined) {
      state.found({ verdict: 'status', offset: differs });
      // A content difference before the status flip still comes first.
      if (differs > pos && (ea.kind === 'data' || eb.kind === 'data')) {
        yield* split(state, pos, differs, ea.kind === 'data', eb.kind === 'data');
      }
      return;
    }
    if (ea.kind === 'data' || eb.kind === 'data') {
      yield* split(state, pos, end, ea.kind === 'data', eb.kind === 'data');
    } else {
      state.skipped(end - pos);
    }
    pos = end;
    if (ea.offset + ea.length === pos) ea = (await extentsA.next()).value as Extent | undefined;
    if (eb.offset + eb.length === pos) eb = (await extentsB.next()).value as Extent | undefined;
  }
}

/** [start, end) cut into pieces of at most COMPARE_CHUNK bytes, counted from `start` as qemu-img does. */
function* split(state: Comparison, start: number, end: number, readA: boolean, readB: boolean): Generator<Piece> {
  for (let pos = start; pos < end; pos += COMPARE_CHUNK) {
    yield { index: state.reserve(), offset: pos, length: Math.min(COMPARE_CHUNK, end - pos), readA, readB };
  }
}

/** What a running comparison has found so far, and its progress. */
class Comparison {
  #first: Difference | undefined;
  /** Bytes compared before the first piece still pending: progress, as a sequential compare makes it. */
  #done = 0;
  #reserved = 0;
  #nextToCount = 0;
  #finished = new Map<number, number>();

  constructor(
    private readonly total: number,
    private readonly options: CompareOptions,
  ) {}

  get first(): Difference | undefined {
    return this.#first;
  }

  /** Keep the difference at the lowest offset: that is the one a sequential comparison meets first. */
  found(difference: Difference): void {
    if (!this.#first || difference.offset < this.#first.offset) this.#first = difference;
  }

  /** Nothing at or past `offset` can matter once a difference before it is known. */
  stopsBefore(offset: number): boolean {
    if (this.options.signal?.aborted) {
      throw new Qcow2Error(ErrorCodes.ABORTED, 'the operation was aborted', { cause: this.options.signal.reason });
    }
    return this.#first !== undefined && this.#first.offset <= offset;
  }

  /** The index of the next piece or skipped run. */
  reserve(): number {
    return this.#reserved++;
  }

  /** A run that needs no I/O is compared as soon as it is met. */
  skipped(length: number): void {
    this.finish(this.reserve(), length);
  }

  /** Piece `index` matched: advance progress over every finished piece before the first pending one. */
  finish(index: number, length: number): void {
    this.#finished.set(index, length);
    const before = this.#done;
    for (let n = this.#finished.get(this.#nextToCount); n !== undefined; n = this.#finished.get(this.#nextToCount)) {
      this.#finished.delete(this.#nextToCount++);
      this.#done += n;
    }
    if (this.#done !== before) this.options.onProgress?.(this.#done, this.total);
  }

  /** Compare the pieces with `parallel` workers, each with its own two buffers. */
  async run(parallel: number, source: AsyncGenerator<Piece>, a: Image, b: Image): Promise<void> {
    let failure: unknown;
    const bufferSize = bufferSizeFor(Math.max(a.size, b.size), COMPARE_CHUNK);
    const worker = async () => {
      const bufferA = allocAligned(bufferSize);
      const bufferB = allocAligned(bufferSize);
      while (failure === undefined) {
        let next: IteratorResult<Piece>;
        try {
          next = await source.next();
        } catch (error) {
          failure ??= error;
          return;
        }
        if (next.done) return;
        const piece = next.value;
        try {
          if (this.stopsBefore(piece.offset)) continue;
          const at = await comparePiece(a, b, piece, bufferA, bufferB);
          if (at !== undefined) this.found({ verdict: 'content', offset: at });
          else this.finish(piece.index, piece.length);
        } catch (error) {
          failure ??= error;
        }
      }
    };
    await Promise.all(Array.from({ length: parallel }, worker));
    await source.return(undefined);
    if (failure !== undefined) throw failure instanceof CompareError ? failure : asQcow2Error(failure);
  }
}

/** Read one piece from the side(s) holding data; the offset of the first different sector, if any. */
async function comparePiece(a: Image, b: Image, piece: Piece, bufferA: Buffer, bufferB: Buffer): Promise<number | undefined> {
  const viewA = bufferA.subarray(0, piece.length);
  const viewB = bufferB.subarray(0, piece.length);
  await Promise.all([
    piece.readA ? readPiece(a, viewA, piece.offset) : viewA.fill(0),
    piece.readB ? readPiece(b, viewB, piece.offset) : viewB.fill(0),
  ]);
  const index = firstDifference(viewA, viewB);
  return index < 0 ? undefined : piece.offset + Math.floor(index / SECTOR) * SECTOR;
}

async function readPiece(image: Image, view: Buffer, offset: number): Promise<void> {
  try {
    await image.read(view, offset);
  } catch (error) {
    const cause = asQcow2Error(error);
    throw new CompareError('read', cause, `Error while reading offset ${offset} of ${image.path}: ${cause.message}`);
  }
}

/** Index of the first byte where `x` and `y` differ, or -1; memcmp on halving ranges, not a byte loop. */
function firstDifference(x: Buffer, y: Buffer): number {
  if (x.equals(y)) return -1;
  let lo = 0;
  let hi = x.length;
  // Invariant: the first difference lies in [lo, hi).
  while (hi - lo > SECTOR) {
    const mid = lo + Math.floor((hi - lo) / 2);
    if (x.compare(y, lo, mid, lo, mid) !== 0) hi = mid;
    else lo = mid;
  }
  for (let i = lo; i < hi; i++) if (x[i] !== y[i]) return i;
  return -1;
}
