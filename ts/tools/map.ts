/** The allocation map of an image, in qemu-img map's terms (library side of `qcow2 map`). */
import { check } from '../errors.js';
import type { Extent, Image } from '../image.js';
import { MAP_RUN_FIELDS, MapFlags, MapKind } from '../native.js';
import { Qcow2Image } from '../qcow2/image.js';

/** One run of the map: the fields of a `qemu-img map --output=json` entry, plus `compressed` and the file. */
export interface MapEntry {
  /** Guest offset of the run. */
  start: number;
  length: number;
  /** Which image of the backing chain the run comes from (0: the image itself). */
  depth: number;
  /** Some image of the chain (or the raw file) allocates the run. */
  present: boolean;
  /** The run reads as zeroes without reading data. */
  zero: boolean;
  /** The run is backed by data that must be read. */
  data: boolean;
  compressed: boolean;
  /** Host offset of the run in `file`, when the run is stored there uncompressed. */
  offset?: number;
  /** The file that holds the run at `offset`. */
  file?: string;
}

/** The part of the disk to map (qemu-img map --start-offset / --max-length). */
export interface MapOptions {
  /** First guest byte to map (default 0). */
  start?: number;
  /** Bytes to map at most; the map stops at the end of the disk either way. */
  maxLength?: number;
}

/** The map entry one extent of `image` stands for. */
export function mapEntryOf(image: Image, extent: Extent): MapEntry {
  // A raw image is its own file: every byte, hole or not, lies at its guest offset.
  const rawIdentity = image.format === 'raw' && extent.depth === 0;
  const hostOffset = extent.hostOffset ?? (rawIdentity ? extent.offset : undefined);
  const compressed = extent.compressed === true;
  const entry: MapEntry = {
    start: extent.offset,
    length: extent.length,
    depth: extent.depth,
    present: extent.kind !== 'unallocated',
    zero: extent.kind !== 'data',
    data: extent.kind === 'data',
    compressed,
  };
  if (hostOffset !== undefined && !compressed) {
    entry.offset = hostOffset;
    entry.file = extent.file ?? image.path;
  }
  return entry;
}

/** qemu-img map joins two runs when they look the same and, if placed, lie back to back in one file. */
export function canMerge(a: MapEntry, b: MapEntry): boolean {
  if (a.length === 0) return false;
  if (a.start + a.length !== b.start) return false;
  if (a.zero !== b.zero || a.data !== b.data || a.depth !== b.depth || a.present !== b.present) return false;
  if (a.compressed !== b.compressed || a.file !== b.file) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  return a.offset === undefined || a.offset + a.length === b.offset;
}

/** The guest range a map covers: [start, end), empty when `start` is at or past the end of the disk. */
export function mapRange(image: Image, options: MapOptions = {}): { start: number; end: number } {
  const start = options.start ?? 0;
  check(Number.isSafeInteger(start) && start >= 0, `map: start must be a non-negative integer, got ${start}`);
  const maxLength = options.maxLength;
  check(
    maxLength === undefined || (Number.isSafeInteger(maxLength) && maxLength >= 0),
    `map: maxLength must be a non-negative integer, got ${maxLength}`,
  );
  const end = Math.min(image.size, maxLength === undefined ? Infinity : start + maxLength);
  return { start, end: Math.max(start, end) };
}

/** The booleans of a map entry, as bits of MapTable.bits. */
export const enum MapBits {
  Present = 1,
  Zero = 2,
  Data = 4,
  Compressed = 8,
}

/** Entries a MapTable holds before mapTables() hands it out. */
const TABLE_ROWS = 4096;

/**
 * Merged map entries in columns, so that a map of hundreds of thousands of runs makes no object
 * per entry. Row i: start[i], length[i], depth[i], bits[i] (MapBits), offset[i] (-1: none), file[i].
 */
export class MapTable {
  count = 0;
  readonly start = new Float64Array(TABLE_ROWS);
  readonly length = new Float64Array(TABLE_ROWS);
  readonly depth = new Uint32Array(TABLE_ROWS);
  readonly bits = new Uint8Array(TABLE_ROWS);
  readonly offset = new Float64Array(TABLE_ROWS);
  readonly file: (string | undefined)[] = new Array<string | undefined>(TABLE_ROWS).fill(undefined);

  /** Row `i` as a MapEntry. */
  entry(i: number): MapEntry {
    const bits = this.bits[i];
    const entry: MapEntry = {
      start: this.start[i],
      length: this.length[i],
      depth: this.depth[i],
      present: (bits & MapBits.Present) !== 0,
      zero: (bits & MapBits.Zero) !== 0,
      data: (bits & MapBits.Data) !== 0,
      compressed: (bits & MapBits.Compressed) !== 0,
    };
    if (this.offset[i] >= 0) {
      entry.offset = this.offset[i];
      entry.file = this.file[i];
    }
    return entry;
  }
}

/** Builds a map entry by entry, joining each to the one before when canMerge() would. */
class MapMerger {
  readonly table = new MapTable();
  #start = 0;
  #length = 0;
  #depth = 0;
  #bits = 0;
  #offset = -1;
  #file: string | undefined;

  /** Add a run; true when the table is full and must be consumed (then reset its count) before the next add. */
  add(start: number, length: number, depth: number, bits: number, offset: number, file: string | undefined): boolean {
    const last = this.#length;
    if (
      last !== 0 &&
      this.#start + last === start &&
      this.#bits === bits &&
      this.#depth === depth &&
      this.#file === file &&
      (this.#offset < 0 ? offset < 0 : offset >= 0 && this.#offset + last === offset)
    ) {
      this.#length += length;
      return false;
    }
    const full = last !== 0 && this.#push();
    this.#start = start;
    this.#length = length;
    this.#depth = depth;
    this.#bits = bits;
    this.#offset = offset;
    this.#file = file;
    return full;
  }

  /** Move the entry being built into the table; true when that filled the table. */
  finish(): boolean {
    if (this.#length === 0) return false;
    this.#push();
    this.#length = 0;
    return true;
  }

  #push(): boolean {
    const t = this.table;
    const i = t.count++;
    t.start[i] = this.#start;
    t.length[i] = this.#length;
    t.depth[i] = this.#depth;
    t.bits[i] = this.#bits;
    t.offset[i] = this.#offset;
    t.file[i] = this.#file;
    return t.count === TABLE_ROWS;
  }
}

/** Runs asked of the engine per call: no object is made per run, so big batches cost no garbage. */
const ENGINE_BATCH = 32768;

/** MapBits of each engine MapKind. */
const KIND_BITS: Record<number, number> = {
  [MapKind.Data]: MapBits.Present | MapBits.Data,
  [MapKind.Zero]: MapBits.Present | MapBits.Zero,
  [MapKind.Unallocated]: MapBits.Zero,
};

/** The booleans of `entry` as MapBits. */
function bitsOf(entry: MapEntry): number {
  return (
    (entry.present ? MapBits.Present : 0) |
    (entry.zero ? MapBits.Zero : 0) |
    (entry.data ? MapBits.Data : 0) |
    (entry.compressed ? MapBits.Compressed : 0)
  );
}

/**
 * The map of `image` from `start`, merged exactly as qemu-img map merges it, in tables of entries.
 * The same table object comes back each time, refilled: consume it before asking for the next.
 * A qcow2 image is mapped straight from the engine's run arrays, with no object per run.
 */
export async function* mapTables(image: Image, options: MapOptions = {}): AsyncGenerator<MapTable> {
  const { start, end } = mapRange(image, options);
  if (start >= end) return;
  const merger = new MapMerger();
  const table = merger.table;
  if (image instanceof Qcow2Image) {
    for await (const runs of image.runBatches({ offset: start, length: end - start }, ENGINE_BATCH)) {
      for (let i = 0; i < runs.length; i += MAP_RUN_FIELDS) {
        const depth = runs[i + 3];
        const flags = runs[i + 5];
        const compressed = (flags & MapFlags.Compressed) !== 0;
        const offset = compressed ? -1 : runs[i + 4];
        const bits = KIND_BITS[runs[i + 2]] | (compressed ? MapBits.Compressed : 0);
        const file = offset >= 0 ? image.fileAt(depth, flags) : undefined;
        if (merger.add(runs[i], runs[i + 1], depth, bits, offset, file)) {
          yield table;
          table.count = 0;
        }
      }
    }
  } else {
    for await (const extent of image.extents({ offset: start, length: end - start })) {
      const e = mapEntryOf(image, extent);
      if (merger.add(e.start, e.length, e.depth, bitsOf(e), e.offset ?? -1, e.file)) {
        yield table;
        table.count = 0;
      }
    }
  }
  merger.finish();
  if (table.count > 0) yield table;
}

/**
 * The map of `image` from `start`, merged exactly as qemu-img map merges it, yielded in
 * batches of entries so that huge maps do not cost a promise per entry.
 */
export async function* mapImage(image: Image, options: MapOptions = {}): AsyncGenerator<MapEntry[]> {
  for await (const table of mapTables(image, options)) {
    const batch: MapEntry[] = new Array<MapEntry>(table.count);
    for (let i = 0; i < table.count; i++) batch[i] = table.entry(i);
    yield batch;
  }
}
