/**
 * Where each metadata structure of a qcow2 file lies, found from the file's raw bytes, so that
 * fuzz mutations can aim at one structure at a time. Test code only: it trusts the pristine seed
 * images qemu-img made, and is never run on mutated bytes.
 */

/** The structures a mutation can aim at. */
export const REGIONS = [
  'header',
  'extensions',
  'l1',
  'l2',
  'l2Used',
  /** The subcluster bitmaps of used entries of extended L2 tables. */
  'l2Bitmaps',
  'refcountTable',
  'refcountBlocks',
  'compressedDescriptors',
  'compressedData',
  'snapshotTable',
  /** The L1 tables of internal snapshots (their L2 tables join 'l2'). */
  'snapshotL1',
  'bitmapDirectory',
  /** The tables of persistent bitmaps, which the bitmap directory points to. */
  'bitmapTables',
] as const;

/** The name of one structure mutations aim at. */
export type RegionName = (typeof REGIONS)[number];

/** One field a mutation may rewrite: `width` bytes at `offset`, big-endian. */
export interface Slot {
  offset: number;
  width: 1 | 2 | 4 | 8;
}

/** A seed image's structures, as slots per region, plus the points where a truncation is most telling. */
export interface Layout {
  fileSize: number;
  clusterSize: number;
  /** Only regions with at least one slot are present. */
  regions: Map<RegionName, Slot[]>;
  /** Starts and ends of structures, sorted and unique. */
  boundaries: number[];
  /** Cluster-aligned starts of structures: where a corrupted offset may point to make tables alias each other. */
  targets: number[];
}

/** Host offset bits of L1, L2 and refcount table entries (spec: bits 9-55). */
export const OFFSET_MASK = 0x00fffffffffffe00n;
const COMPRESSED = 1n << 62n;
const EXT_BITMAPS = 0x23852875;

/** The fixed header fields: offset and width (spec, version 2 part first). */
const V2_FIELDS: Slot[] = [
  [0, 4],
  [4, 4],
  [8, 8],
  [16, 4],
  [20, 4],
  [24, 8],
  [32, 4],
  [36, 4],
  [40, 8],
  [48, 8],
  [56, 4],
  [60, 4],
  [64, 8],
].map(([offset, width]) => ({ offset, width }) as Slot);
const V3_FIELDS: Slot[] = [
  [72, 8],
  [80, 8],
  [88, 8],
  [96, 4],
  [100, 4],
].map(([offset, width]) => ({ offset, width }) as Slot);

/** Slots of `width` bytes covering [start, end). */
function slotsOver(start: number, end: number, width: Slot['width']): Slot[] {
  const out: Slot[] = [];
  for (let at = start; at + width <= end; at += width) out.push({ offset: at, width });
  return out;
}

/** Reads a seed's structures; every table it follows was written by qemu-img. */
class SeedReader {
  readonly clusterSize: number;
  readonly extendedL2: boolean;
  readonly regions = new Map<RegionName, Slot[]>();
  readonly boundaries = new Set<number>();
  readonly targets = new Set<number>([0]);
  readonly l2Seen = new Set<number>();

  constructor(readonly bytes: Buffer) {
    this.clusterSize = 2 ** bytes.readUInt32BE(20);
    const version = bytes.readUInt32BE(4);
    this.extendedL2 = version === 3 && (bytes.readBigUInt64BE(72) & (1n << 4n)) !== 0n;
  }

  u64(at: number): bigint {
    return this.bytes.readBigUInt64BE(at);
  }

  add(region: RegionName, slots: Slot[], start: number, end: number): void {
    if (slots.length === 0) return;
    this.regions.set(region, [...(this.regions.get(region) ?? []), ...slots]);
    this.boundaries.add(start);
    this.boundaries.add(end);
    this.targets.add(start - (start % this.clusterSize));
  }

  readHeaderAndExtensions(): void {
    const b = this.bytes;
    const version = b.readUInt32BE(4);
    const headerLength = version === 2 ? 72 : b.readUInt32BE(100);
    const fields = version === 2 ? V2_FIELDS : [...V2_FIELDS, ...V3_FIELDS];
    if (headerLength > 104) fields.push({ offset: 104, width: 1 });
    this.add('header', fields, 0, headerLength);
    let at = headerLength;
    while (b.readUInt32BE(at) !== 0) {
      if (b.readUInt32BE(at) === EXT_BITMAPS) this.readBitmapDirectory(at + 8);
      at += 8 + Math.ceil(b.readUInt32BE(at + 4) / 8) * 8;
    }
    const backingOffset = Number(this.u64(8));
    const end = Math.max(at + 8, backingOffset + b.readUInt32BE(16));
    this.add('extensions', slotsOver(headerLength, Math.ceil(end / 4) * 4, 4), headerLength, end);
  }

  readBitmapDirectory(extension: number): void {
    const count = this.bytes.readUInt32BE(extension);
    const size = Number(this.u64(extension + 8));
    const offset = Number(this.u64(extension + 16));
    this.add('bitmapDirectory', slotsOver(offset, offset + size, 4), offset, offset + size);
    // Entries (spec, "Bitmap directory"): table offset u64, table size u32, …, name size u16 at 18, extra data size u32 at 20.
    let at = offset;
    for (let i = 0; i < count; i++) {
      const table = Number(this.u64(at) & OFFSET_MASK);
      const entries = this.bytes.readUInt32BE(at + 8);
      if (table !== 0) this.add('bitmapTables', slotsOver(table, table + 8 * entries, 8), table, table + 8 * entries);
      at += Math.ceil((24 + this.bytes.readUInt32BE(at + 20) + this.bytes.readUInt16BE(at + 18)) / 8) * 8;
    }
  }

  readMappingTables(): void {
    const l1Size = this.bytes.readUInt32BE(36);
    const l1Offset = Number(this.u64(40));
    this.add('l1', slotsOver(l1Offset, l1Offset + 8 * l1Size, 8), l1Offset, l1Offset + 8 * l1Size);
    for (let i = 0; i < l1Size; i++) {
      const table = Number(this.u64(l1Offset + 8 * i) & OFFSET_MASK);
      if (table !== 0) this.readL2Table(table);
    }
  }

  readL2Table(table: number): void {
    if (this.l2Seen.has(table)) return;
    this.l2Seen.add(table);
    const all = slotsOver(table, table + this.clusterSize, 8);
    this.add('l2', all, table, table + this.clusterSize);
    this.add('l2Used', all.filter((s) => this.u64(s.offset) !== 0n), table, table + this.clusterSize);
    const entryBytes = this.extendedL2 ? 16 : 8;
    const bitmaps: Slot[] = [];
    for (let at = table; at < table + this.clusterSize; at += entryBytes) {
      const entry = this.u64(at);
      if ((entry & COMPRESSED) !== 0n) this.readCompressed(at, entry);
      if (this.extendedL2 && (entry !== 0n || this.u64(at + 8) !== 0n)) bitmaps.push({ offset: at + 8, width: 8 });
    }
    this.add('l2Bitmaps', bitmaps, table, table + this.clusterSize);
  }

  /** A compressed descriptor and the bytes of its compressed data (spec: "Compressed Clusters Descriptor"). */
  readCompressed(at: number, entry: bigint): void {
    const x = BigInt(62 - (Math.log2(this.clusterSize) - 8));
    const hostOffset = Number(entry & ((1n << x) - 1n));
    const sectors = Number((entry >> x) & ((1n << (62n - x)) - 1n)) + 1;
    const end = Math.min(this.bytes.length, hostOffset - (hostOffset % 512) + sectors * 512);
    this.add('compressedDescriptors', [{ offset: at, width: 8 }], at, at + 8);
    this.add('compressedData', slotsOver(hostOffset, end, 1), hostOffset, end);
  }

  readRefcounts(): void {
    const offset = Number(this.u64(48));
    const bytes = this.bytes.readUInt32BE(56) * this.clusterSize;
    const entries = slotsOver(offset, offset + bytes, 8);
    const used = entries.filter((s) => this.u64(s.offset) !== 0n);
    // One empty entry past the used ones: pointing it somewhere is as telling as breaking a used one.
    const firstFree = entries.find((s) => this.u64(s.offset) === 0n);
    this.add('refcountTable', firstFree ? [...used, firstFree] : used, offset, offset + bytes);
    for (const slot of used) {
      const block = Number(this.u64(slot.offset) & OFFSET_MASK);
      const words = slotsOver(block, block + this.clusterSize, 8).filter((s) => this.u64(s.offset) !== 0n);
      this.add('refcountBlocks', words, block, block + this.clusterSize);
    }
  }

  /** A snapshot's L1 table, and the L2 tables only it points to. */
  readSnapshotL1(offset: number, size: number): void {
    this.add('snapshotL1', slotsOver(offset, offset + 8 * size, 8), offset, offset + 8 * size);
    for (let i = 0; i < size; i++) {
      const table = Number(this.u64(offset + 8 * i) & OFFSET_MASK);
      if (table !== 0) this.readL2Table(table);
    }
  }

  /** The snapshot table: entries of 40 fixed bytes, extra data, id and name, each padded to 8. */
  readSnapshotTable(): void {
    const count = this.bytes.readUInt32BE(60);
    const start = Number(this.u64(64));
    let at = start;
    for (let i = 0; i < count; i++) {
      const b = this.bytes;
      this.readSnapshotL1(Number(this.u64(at)), b.readUInt32BE(at + 8));
      const length = 40 + b.readUInt32BE(at + 36) + b.readUInt16BE(at + 12) + b.readUInt16BE(at + 14);
      at += Math.ceil(length / 8) * 8;
    }
    this.add('snapshotTable', slotsOver(start, Math.min(at, this.bytes.length), 4), start, at);
  }
}

/** The layout of a pristine qcow2 image made by qemu-img. */
export function readLayout(bytes: Buffer): Layout {
  const reader = new SeedReader(bytes);
  reader.readHeaderAndExtensions();
  reader.readMappingTables();
  reader.readRefcounts();
  reader.readSnapshotTable();
  const boundaries = [...reader.boundaries, bytes.length].filter((b) => b <= bytes.length).sort((a, b) => a - b);
  return {
    fileSize: bytes.length,
    clusterSize: reader.clusterSize,
    regions: reader.regions,
    boundaries: [...new Set(boundaries)],
    targets: [...reader.targets].sort((a, b) => a - b),
  };
}
