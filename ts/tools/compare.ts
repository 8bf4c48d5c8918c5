/** Comparing the guest contents of two images (library side of `qcow2 compare`). */
import { ErrorCodes, Qcow2Error, asQcow2Error, check } from '../errors.js';
import type { Extent, Image } from '../image.js';
import { allocAligned } from '../native.js';
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

/** Virtual sizes down the backing chain of `image`: [its own, its backing file's, …]. */
function chainSizes(image: Image): number[] {
  const sizes: number[] = [];
  for (let layer: Image | undefined = image; layer; layer = (layer as { backing?: Image }).backing) sizes.push(layer.size);
  return sizes;
}

/**
 * The allocation status qemu-img compare -s compares, as one string: allocated, zero, data,
 * placed in a file, and whether the run ends where the answering layer (or the image) ends.
 */
function statusKey(image: Image, sizes: number[], extent: Extent): string {
  const e = mapEntryOf(image, extent);
  const end = extent.offset + extent.length;
  let allocated = e.present;
  let eof = end === image.size;
  if (extent.kind === 'unallocated') {
    // Unallocated above a backing file means past that file's end: QEMU counts the zeroes it
    // makes up there as allocated. At the bottom of the chain the bottom file's end counts.
    if (extent.depth < sizes.length - 1) allocated = true;
    else eof ||= end === sizes[extent.depth];
  }
  return `${allocated}:${e.zero}:${e.data}:${e.offset !== undefined}:${eof}`;
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
  const sizesA = chainSizes(a);
  const sizesB = chainSizes(b);
  let ea = (await extentsA.next()).value as Extent | undefined;
  let eb = (await extentsB.next()).value as Extent | undefined;
  for (let pos = 0; ea && eb && !state.stopsBefore(pos); ) {
    if (strict && statusKey(a, sizesA, ea) !== statusKey(b, sizesB, eb)) {
      state.found({ verdict: 'status', offset: pos });
      return;
    }
    const end = Math.min(ea.offset + ea.length, eb.offset + eb.length);
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
