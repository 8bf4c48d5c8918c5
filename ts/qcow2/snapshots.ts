/** The qcow2 snapshot table: variable-length entries read for listing, every field bounded. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import { align8 } from './extensions.js';
import { MAX_L1_BYTES, Qcow2Header } from './header.js';
import { MetadataFile, readRange } from './metadata-file.js';
import { decodeName, encodeName } from './text.js';

/** qemu's bound on a snapshot entry's extra data. */
export const MAX_SNAPSHOT_EXTRA_DATA = 1024;
/** qemu's bound on the whole snapshot table. */
export const MAX_SNAPSHOT_TABLE_SIZE = 64 * 1024 * 1024;
const FIXED_ENTRY_SIZE = 40;
const ALL_ONES = 0xffffffffffffffffn;

/** One internal snapshot as its table entry describes it. */
export interface SnapshotEntry {
  /** Where the entry starts in the file. */
  entryOffset: number;
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  /** Creation time: seconds since the epoch and the nanoseconds past them. */
  dateSec: number;
  dateNsec: number;
  /** Guest run time when taken, in nanoseconds (64-bit, hence bigint). */
  vmClockNsec: bigint;
  /** VM state size in bytes (the 64-bit extra field when present, else the 32-bit one). */
  vmStateSize: number;
  /** Virtual disk size when taken (extra data bytes 48-55), when present. */
  diskSize?: number;
  /** Guest instruction count when taken (extra data bytes 56-63), when present and not -1. */
  icount?: bigint;
  /** The entry's extra data, byte-exact. */
  extraData: Buffer;
}

/** The snapshot table read from an image. */
export interface SnapshotTable {
  entries: SnapshotEntry[];
  /** Bytes the table occupies from header.snapshotsOffset, the last entry's padding included. */
  byteLength: number;
  /** Indices of the entries qemu calls incomplete: extra data too short for the 64-bit VM state size and the disk size. */
  incompleteEntries: number[];
  /** Tolerant reads only: entries whose extra data exceeded MAX_SNAPSHOT_EXTRA_DATA, cut to it (qemu-img check -r all's discard). */
  oversizedExtraData: { index: number; size: number }[];
}

/** Extra data bytes every entry written by qemu 5.0 and later has (VM state size and disk size). */
const COMPLETE_EXTRA_DATA = 16;

function corrupt(message: string): Qcow2Error {
  return new Qcow2Error(ErrorCodes.CORRUPT, message);
}

/**
 * Reads the table front to back in growing chunks, never past the table bound, nor past the file
 * unless `zeroPastEnd` (then, as qemu's reads do, bytes past the end of the file read as zeros).
 */
class TableReader {
  private data = Buffer.alloc(0);
  private readonly limit: number;

  constructor(
    private readonly file: MetadataFile,
    private readonly start: number,
    zeroPastEnd = false,
  ) {
    this.limit = zeroPastEnd ? MAX_SNAPSHOT_TABLE_SIZE : Math.min(MAX_SNAPSHOT_TABLE_SIZE, Math.max(0, file.size - start));
  }

  /** The buffered table bytes, holding at least [0, end). */
  async ensure(end: number, what: string): Promise<Buffer> {
    if (end <= this.data.length) return this.data;
    if (end > this.limit) {
      const bound = this.limit === MAX_SNAPSHOT_TABLE_SIZE ? `the ${MAX_SNAPSHOT_TABLE_SIZE} byte table limit` : `the end of the file (${this.file.size} bytes)`;
      throw corrupt(`snapshot table: ${what} at offset ${this.start + end - 1} lies past ${bound}`);
    }
    const want = Math.min(this.limit, Math.max(end, this.data.length * 2, 64 * 1024));
    const from = this.start + this.data.length;
    const inFile = Math.max(0, Math.min(want - this.data.length, this.file.size - from));
    const more = await readRange(this.file, from, inFile, 'snapshot table');
    this.data = Buffer.concat([this.data, more, Buffer.alloc(want - this.data.length - inFile)]);
    return this.data;
  }
}

/** Read a u64 that must fit a safe integer. */
function safeU64(buf: Buffer, at: number, what: string, index: number): number {
  const value = buf.readBigUInt64BE(at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`snapshot ${index}: ${what} ${value} exceeds 2^53`);
  return Number(value);
}

/** A snapshot's L1 table must be bounded, aligned and inside the file. */
function checkL1Table(l1TableOffset: number, l1Size: number, index: number, header: Qcow2Header, fileSize: number): void {
  if (l1Size * 8 > MAX_L1_BYTES) throw corrupt(`snapshot ${index}: L1 table size ${l1Size} entries exceeds the ${MAX_L1_BYTES} byte limit`);
  if (l1TableOffset % header.clusterSize !== 0) {
    throw corrupt(`snapshot ${index}: L1 table offset ${l1TableOffset} is not aligned to the cluster size ${header.clusterSize}`);
  }
  if (l1Size > 0 && (l1TableOffset < header.clusterSize || l1TableOffset + l1Size * 8 > fileSize)) {
    throw corrupt(`snapshot ${index}: L1 table at ${l1TableOffset} (+${l1Size * 8} bytes) lies outside ${header.clusterSize}..${fileSize}`);
  }
}

/** Decode the entry at `at` of `buf` (the whole entry is present); `index` and `header` for checks. */
function decodeEntry(buf: Buffer, at: number, index: number, header: Qcow2Header, fileSize: number, checkL1: boolean): SnapshotEntry {
  const l1TableOffset = safeU64(buf, at, 'L1 table offset', index);
  const l1Size = buf.readUInt32BE(at + 8);
  const idSize = buf.readUInt16BE(at + 12);
  const nameSize = buf.readUInt16BE(at + 14);
  const extraSize = buf.readUInt32BE(at + 36);
  if (checkL1) checkL1Table(l1TableOffset, l1Size, index, header, fileSize);
  const extraStart = at + FIXED_ENTRY_SIZE;
  const extraData = Buffer.from(buf.subarray(extraStart, extraStart + extraSize));
  const idStart = extraStart + extraSize;
  const entry: SnapshotEntry = {
    entryOffset: header.snapshotsOffset + at,
    l1TableOffset,
    l1Size,
    id: decodeName(buf.subarray(idStart, idStart + idSize)),
    name: decodeName(buf.subarray(idStart + idSize, idStart + idSize + nameSize)),
    dateSec: buf.readUInt32BE(at + 16),
    dateNsec: buf.readUInt32BE(at + 20),
    vmClockNsec: buf.readBigUInt64BE(at + 24),
    vmStateSize: extraSize >= 8 ? safeU64(extraData, 0, 'VM state size', index) : buf.readUInt32BE(at + 32),
    extraData,
  };
  if (extraSize >= 16) entry.diskSize = safeU64(extraData, 8, 'disk size', index);
  if (extraSize >= 24) {
    const icount = extraData.readBigUInt64BE(16);
    if (icount !== ALL_ONES) entry.icount = icount;
  }
  return entry;
}

/**
 * Read the snapshot table the header points at; the whole table must lie inside the file. With
 * `checkL1` false the read is qemu-img check's: the snapshots' L1 tables are left unchecked (the
 * check reports them itself), bytes past the end of the file read as zeros, and extra data over
 * the bound is cut to it and listed (counting the table as qemu does, with the cut size).
 */
export async function readSnapshots(file: MetadataFile, header: Qcow2Header, checkL1 = true): Promise<SnapshotTable> {
  const reader = new TableReader(file, header.snapshotsOffset, !checkL1);
  const entries: SnapshotEntry[] = [];
  const incompleteEntries: number[] = [];
  const oversizedExtraData: { index: number; size: number }[] = [];
  let at = 0;
  let counted = 0;
  for (let index = 0; index < header.nbSnapshots; index++) {
    let buf = await reader.ensure(at + FIXED_ENTRY_SIZE, `entry ${index}`);
    const extraSize = buf.readUInt32BE(at + 36);
    if (extraSize > MAX_SNAPSHOT_EXTRA_DATA) {
      if (checkL1) throw corrupt(`snapshot ${index}: extra data size ${extraSize} exceeds ${MAX_SNAPSHOT_EXTRA_DATA}`);
      oversizedExtraData.push({ index, size: extraSize });
    }
    const names = buf.readUInt16BE(at + 12) + buf.readUInt16BE(at + 14);
    const length = FIXED_ENTRY_SIZE + extraSize + names;
    // qemu-img leaves the last entry's padding out of the file: only the entry itself must be there.
    buf = await reader.ensure(at + length, `entry ${index}`);
    const entry = decodeEntry(buf, at, index, header, file.size, checkL1);
    if (extraSize > MAX_SNAPSHOT_EXTRA_DATA) entry.extraData = entry.extraData.subarray(0, MAX_SNAPSHOT_EXTRA_DATA);
    entries.push(entry);
    if (extraSize < COMPLETE_EXTRA_DATA) incompleteEntries.push(index);
    at += align8(length);
    counted = align8(counted + FIXED_ENTRY_SIZE + entry.extraData.length + names);
  }
  return { entries, byteLength: counted, incompleteEntries, oversizedExtraData };
}

/** qemu's known extra data: 64-bit VM state size, disk size and instruction count. */
const KNOWN_EXTRA_DATA = 24;

/** A name as qemu writes it back: its bytes up to the first NUL (qemu keeps names as C strings). */
function storedName(name: string): Buffer {
  const bytes = encodeName(name);
  const nul = bytes.indexOf(0);
  return nul < 0 ? bytes : bytes.subarray(0, nul);
}

/**
 * Encode `entries` as qemu writes a snapshot table: every entry gets the known extra data (the VM
 * state size, the disk size, `diskSize` where the entry has none, and the instruction count, -1 for
 * none), unknown extra data is kept, and the last entry's padding is left out.
 */
export function encodeSnapshotTable(entries: readonly SnapshotEntry[], diskSize: number): Buffer {
  const parts: Buffer[] = [];
  let length = 0;
  for (const e of entries) {
    const padding = align8(length) - length;
    if (padding) parts.push(Buffer.alloc(padding));
    const id = storedName(e.id);
    const name = storedName(e.name);
    const extraSize = Math.max(KNOWN_EXTRA_DATA, e.extraData.length);
    const fixed = Buffer.alloc(FIXED_ENTRY_SIZE + KNOWN_EXTRA_DATA);
    fixed.writeBigUInt64BE(BigInt(e.l1TableOffset), 0);
    fixed.writeUInt32BE(e.l1Size, 8);
    fixed.writeUInt16BE(id.length, 12);
    fixed.writeUInt16BE(name.length, 14);
    fixed.writeUInt32BE(e.dateSec, 16);
    fixed.writeUInt32BE(e.dateNsec, 20);
    fixed.writeBigUInt64BE(e.vmClockNsec, 24);
    // A VM state too large for the 32-bit field makes older readers see a disk-only snapshot.
    fixed.writeUInt32BE(e.vmStateSize <= 0xffffffff ? e.vmStateSize : 0, 32);
    fixed.writeUInt32BE(extraSize, 36);
    fixed.writeBigUInt64BE(BigInt(e.vmStateSize), 40);
    fixed.writeBigUInt64BE(BigInt(e.diskSize ?? diskSize), 48);
    fixed.writeBigUInt64BE(e.icount ?? ALL_ONES, 56);
    const unknown = e.extraData.subarray(Math.min(KNOWN_EXTRA_DATA, e.extraData.length));
    parts.push(fixed, unknown, id, name);
    length = align8(length) + fixed.length + unknown.length + id.length + name.length;
  }
  return Buffer.concat(parts);
}
