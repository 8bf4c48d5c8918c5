/** The allocation map of an image, in qemu-img map's terms (library side of `qcow2 map`). */
import { check } from '../errors.js';
import type { Extent, Image } from '../image.js';

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

/**
 * The map of `image` from `start`, merged exactly as qemu-img map merges it, yielded in
 * batches of entries so that huge maps do not cost a promise per entry.
 */
export async function* mapImage(image: Image, options: MapOptions = {}): AsyncGenerator<MapEntry[]> {
  const { start, end } = mapRange(image, options);
  if (start >= end) return;
  let batch: MapEntry[] = [];
  let current: MapEntry | undefined;
  for await (const extent of image.extents({ offset: start, length: end - start })) {
    const next = mapEntryOf(image, extent);
    if (current && canMerge(current, next)) {
      current.length += next.length;
      continue;
    }
    if (current) batch.push(current);
    current = next;
    if (batch.length >= 4096) {
      yield batch;
      batch = [];
    }
  }
  if (current) batch.push(current);
  if (batch.length > 0) yield batch;
}
