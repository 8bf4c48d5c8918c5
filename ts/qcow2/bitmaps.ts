/** The qcow2 bitmap directory: persistent dirty bitmaps' names, flags and tables, every field bounded. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import { align8 } from './extensions.js';
import type { Qcow2Header } from './header.js';
import { MetadataFile, readRange } from './metadata-file.js';
import { decodeName, encodeName } from './text.js';

/** Bitmap directory entry flags. */
export const BitmapFlag = { IN_USE: 1, AUTO: 2, EXTRA_DATA_COMPATIBLE: 4 } as const;
const KNOWN_FLAGS = 0b111;
/** The only bitmap type: dirty tracking. */
export const BITMAP_TYPE_DIRTY_TRACKING = 1;
/** Least granularity bits qemu supports (512 bytes a bit). */
export const MIN_GRANULARITY_BITS = 9;
/** Most granularity bits qemu supports (2 GiB a bit). */
export const MAX_GRANULARITY_BITS = 31;
/** qemu's bound on bitmap names. */
export const MAX_BITMAP_NAME = 1023;
const FIXED_ENTRY_SIZE = 24;

/** One bitmap as its directory entry describes it. */
export interface BitmapEntry {
  name: string;
  bitmapTableOffset: number;
  /** Entries of the bitmap table. */
  bitmapTableSize: number;
  flags: number;
  inUse: boolean;
  auto: boolean;
  type: number;
  granularityBits: number;
  /** Bytes of the virtual disk one bit covers. */
  granularity: number;
  extraData: Buffer;
}

function corrupt(message: string): Qcow2Error {
  return new Qcow2Error(ErrorCodes.CORRUPT, message);
}

/** Bitmap table entries a bitmap of this granularity needs for the disk. */
export function bitmapTableEntries(size: number, granularityBits: number, clusterSize: number): number {
  const bits = Math.ceil(size / 2 ** granularityBits);
  return Math.ceil(Math.ceil(bits / 8) / clusterSize);
}

/**
 * Decode the entry at `at`. With `anywhere` (qemu-img check's reading) the bitmap table may lie past
 * the end of the file or beyond 2^53: the check reports it; `tableOffset` then is the one to use.
 */
function decodeEntry(
  dir: Buffer,
  at: number,
  index: number,
  header: Qcow2Header,
  fileSize: number,
  anywhere = false,
): { entry: BitmapEntry; next: number; tableOffset: bigint } {
  if (at + FIXED_ENTRY_SIZE > dir.length) throw corrupt(`bitmap ${index}: entry at ${at} runs past the directory size ${dir.length}`);
  const tableOffset = dir.readBigUInt64BE(at);
  const bitmapTableSize = dir.readUInt32BE(at + 8);
  const flags = dir.readUInt32BE(at + 12);
  const type = dir[at + 16];
  const granularityBits = dir[at + 17];
  const nameSize = dir.readUInt16BE(at + 18);
  const extraSize = dir.readUInt32BE(at + 20);
  const next = at + align8(FIXED_ENTRY_SIZE + extraSize + nameSize);
  if (next > dir.length) throw corrupt(`bitmap ${index}: entry of ${next - at} bytes at ${at} runs past the directory size ${dir.length}`);
  if (nameSize < 1 || nameSize > MAX_BITMAP_NAME) throw corrupt(`bitmap ${index}: name size ${nameSize} is outside 1..${MAX_BITMAP_NAME}`);
  if (type !== BITMAP_TYPE_DIRTY_TRACKING) throw corrupt(`bitmap ${index}: type ${type} is not ${BITMAP_TYPE_DIRTY_TRACKING} (dirty tracking)`);
  if (granularityBits < MIN_GRANULARITY_BITS || granularityBits > MAX_GRANULARITY_BITS) {
    throw corrupt(`bitmap ${index}: granularity bits ${granularityBits} is outside ${MIN_GRANULARITY_BITS}..${MAX_GRANULARITY_BITS}`);
  }
  if ((flags & ~KNOWN_FLAGS) !== 0) throw corrupt(`bitmap ${index}: reserved flag bits 0x${(flags & ~KNOWN_FLAGS).toString(16)} are set`);
  const expected = bitmapTableEntries(header.size, granularityBits, header.clusterSize);
  if (bitmapTableSize !== expected) {
    throw corrupt(`bitmap ${index}: bitmap table size ${bitmapTableSize} entries does not match the ${expected} the disk size needs`);
  }
  if (tableOffset % BigInt(header.clusterSize) !== 0n) {
    throw corrupt(`bitmap ${index}: bitmap table offset ${tableOffset} is not aligned to the cluster size ${header.clusterSize}`);
  }
  if (bitmapTableSize > 0 && tableOffset < BigInt(header.clusterSize)) {
    throw corrupt(`bitmap ${index}: bitmap table offset ${tableOffset} lies in the header cluster`);
  }
  const safe = tableOffset <= BigInt(Number.MAX_SAFE_INTEGER);
  if (!safe && !anywhere) throw corrupt(`bitmap ${index}: bitmap table offset ${tableOffset} exceeds 2^53`);
  // Unused when not safe: only the check reads such entries, through `tableOffset`.
  const bitmapTableOffset = safe ? Number(tableOffset) : 0;
  if (!anywhere && bitmapTableSize > 0 && bitmapTableOffset + bitmapTableSize * 8 > fileSize) {
    throw corrupt(`bitmap ${index}: bitmap table at ${bitmapTableOffset} (+${bitmapTableSize * 8} bytes) lies outside ${header.clusterSize}..${fileSize}`);
  }
  const extraStart = at + FIXED_ENTRY_SIZE;
  const nameStart = extraStart + extraSize;
  const entry: BitmapEntry = {
    name: decodeName(dir.subarray(nameStart, nameStart + nameSize)),
    bitmapTableOffset,
    bitmapTableSize,
    flags,
    inUse: (flags & BitmapFlag.IN_USE) !== 0,
    auto: (flags & BitmapFlag.AUTO) !== 0,
    type,
    granularityBits,
    granularity: 2 ** granularityBits,
    extraData: Buffer.from(dir.subarray(extraStart, nameStart)),
  };
  return { entry, next, tableOffset };
}

/** Decode a whole bitmap directory: `nbBitmaps` entries filling exactly `dir.length` bytes, names unique. */
export function parseBitmapDirectory(dir: Buffer, header: Qcow2Header, fileSize: number): BitmapEntry[] {
  return decodeDirectory(dir, header, fileSize, false).map((d) => d.entry);
}

function decodeDirectory(dir: Buffer, header: Qcow2Header, fileSize: number, anywhere: boolean): { entry: BitmapEntry; tableOffset: bigint }[] {
  const nb = header.bitmaps?.nbBitmaps ?? 0;
  const entries: { entry: BitmapEntry; tableOffset: bigint }[] = [];
  const names = new Set<string>();
  let at = 0;
  for (let index = 0; index < nb; index++) {
    const { entry, next, tableOffset } = decodeEntry(dir, at, index, header, fileSize, anywhere);
    if (names.has(entry.name)) throw corrupt(`bitmap ${index}: name '${entry.name}' is used twice`);
    names.add(entry.name);
    entries.push({ entry, tableOffset });
    at = next;
  }
  if (at !== dir.length) throw corrupt(`bitmap directory: ${nb} entries take ${at} bytes, the extension says ${dir.length}`);
  return entries;
}

/** Read the bitmap directory the header's bitmaps extension points at ([] when there is none). */
export async function readBitmaps(file: MetadataFile, header: Qcow2Header): Promise<BitmapEntry[]> {
  if (!header.bitmaps) return [];
  const { bitmapDirectoryOffset, bitmapDirectorySize } = header.bitmaps;
  const dir = await readRange(file, bitmapDirectoryOffset, bitmapDirectorySize, 'bitmap directory');
  return parseBitmapDirectory(dir, header, file.size);
}

/**
 * The bitmap tables the directory names, as qemu-img check reads them: a table may lie past the end
 * of the file (the check reports it; its entries read as zeros), so offsets are 64-bit.
 */
export async function readBitmapTables(file: MetadataFile, header: Qcow2Header): Promise<{ offset: bigint; entries: number }[]> {
  if (!header.bitmaps) return [];
  const { bitmapDirectoryOffset, bitmapDirectorySize } = header.bitmaps;
  const dir = await readRange(file, bitmapDirectoryOffset, bitmapDirectorySize, 'bitmap directory');
  return decodeDirectory(dir, header, file.size, true).map(({ entry, tableOffset }) => ({ offset: tableOffset, entries: entry.bitmapTableSize }));
}

/** Bytes of the directory entry of `entry` (padding included). */
function entrySize(entry: BitmapEntry): number {
  return align8(FIXED_ENTRY_SIZE + entry.extraData.length + encodeName(entry.name).length);
}

/** Encode a bitmap directory: the entries in order, each padded with zeros to a multiple of 8 bytes. */
export function encodeBitmapDirectory(entries: readonly BitmapEntry[]): Buffer {
  const out = Buffer.alloc(entries.reduce((sum, e) => sum + entrySize(e), 0));
  let at = 0;
  for (const e of entries) {
    const name = encodeName(e.name);
    out.writeBigUInt64BE(BigInt(e.bitmapTableOffset), at);
    out.writeUInt32BE(e.bitmapTableSize, at + 8);
    out.writeUInt32BE(e.flags >>> 0, at + 12);
    out[at + 16] = e.type;
    out[at + 17] = e.granularityBits;
    out.writeUInt16BE(name.length, at + 18);
    out.writeUInt32BE(e.extraData.length, at + 20);
    e.extraData.copy(out, at + FIXED_ENTRY_SIZE);
    name.copy(out, at + FIXED_ENTRY_SIZE + e.extraData.length);
    at += entrySize(e);
  }
  return out;
}

/** `entry` with the in_use flag set or cleared. */
export function withInUse(entry: BitmapEntry, inUse: boolean): BitmapEntry {
  const flags = inUse ? entry.flags | BitmapFlag.IN_USE : entry.flags & ~BitmapFlag.IN_USE;
  return { ...entry, flags, inUse };
}
