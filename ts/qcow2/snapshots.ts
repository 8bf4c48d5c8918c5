/** The qcow2 snapshot table: variable-length entries read for listing, every field bounded. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import { align8 } from './extensions.js';
import { MAX_L1_BYTES, Qcow2Header } from './header.js';
import { MetadataFile, readRange } from './metadata-file.js';
import { decodeName } from './text.js';

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
}

function corrupt(message: string): Qcow2Error {
  return new Qcow2Error(ErrorCodes.CORRUPT, message);
}

/** Reads the table front to back in growing chunks, never past the file or the table bound. */
class TableReader {
  private data = Buffer.alloc(0);
  private readonly limit: number;

  constructor(
    private readonly file: MetadataFile,
    private readonly start: number,
  ) {
    this.limit = Math.min(MAX_SNAPSHOT_TABLE_SIZE, Math.max(0, file.size - start));
  }

  /** The buffered table bytes, holding at least [0, end). */
  async ensure(end: number, what: string): Promise<Buffer> {
    if (end <= this.data.length) return this.data;
    if (end > this.limit) {
      const bound = this.limit === MAX_SNAPSHOT_TABLE_SIZE ? `the ${MAX_SNAPSHOT_TABLE_SIZE} byte table limit` : `the end of the file (${this.file.size} bytes)`;
      throw corrupt(`snapshot table: ${what} at offset ${this.start + end - 1} lies past ${bound}`);
    }
    const want = Math.min(this.limit, Math.max(end, this.data.length * 2, 64 * 1024));
    const more = await readRange(this.file, this.start + this.data.length, want - this.data.length, 'snapshot table');
    this.data = Buffer.concat([this.data, more]);
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
 * `checkL1` false the snapshots' L1 tables are left unchecked (qemu-img check reports them itself).
 */
export async function readSnapshots(file: MetadataFile, header: Qcow2Header, checkL1 = true): Promise<SnapshotTable> {
  const reader = new TableReader(file, header.snapshotsOffset);
  const entries: SnapshotEntry[] = [];
  let at = 0;
  for (let index = 0; index < header.nbSnapshots; index++) {
    let buf = await reader.ensure(at + FIXED_ENTRY_SIZE, `entry ${index}`);
    const extraSize = buf.readUInt32BE(at + 36);
    if (extraSize > MAX_SNAPSHOT_EXTRA_DATA) {
      throw corrupt(`snapshot ${index}: extra data size ${extraSize} exceeds ${MAX_SNAPSHOT_EXTRA_DATA}`);
    }
    const length = FIXED_ENTRY_SIZE + extraSize + buf.readUInt16BE(at + 12) + buf.readUInt16BE(at + 14);
    // qemu-img leaves the last entry's padding out of the file: only the entry itself must be there.
    buf = await reader.ensure(at + length, `entry ${index}`);
    entries.push(decodeEntry(buf, at, index, header, file.size, checkL1));
    at += align8(length);
  }
  return { entries, byteLength: at };
}
