/** The typed face of the C++ addon: every native call is declared once here. */
import path from 'node:path';

/** qemu-img's host cache modes (-t/-T). `none` and `directsync` use O_DIRECT. */
export type CacheMode = 'none' | 'writeback' | 'unsafe' | 'directsync' | 'writethrough';

export const CACHE_MODES: readonly CacheMode[] = ['none', 'writeback', 'unsafe', 'directsync', 'writethrough'];

export interface NativeFileOptions {
  writable?: boolean;
  /** Create the file when it does not exist (never truncates). */
  create?: boolean;
  cache?: CacheMode;
}

/** How a file was opened, as discovered by the addon. */
export interface NativeFileInfo {
  path: string;
  writable: boolean;
  cache: CacheMode;
  /** O_DIRECT is in use. */
  direct: boolean;
  /** O_DIRECT was asked for, the file system refused it, and buffered I/O is used instead. */
  directFallback: boolean;
  blockDevice: boolean;
  /** Alignment of buffer addresses for O_DIRECT (1 when buffered). */
  memAlign: number;
  /** Alignment of offsets and lengths for O_DIRECT (1 when buffered). */
  reqAlign: number;
}

/** A file opened by the addon; every call runs on the addon's thread pool. Any offset and length work. */
export interface NativeFile {
  readonly info: NativeFileInfo;
  /** Fill `buffer` from `offset`; bytes past the end of the file read as zero. */
  read(buffer: Uint8Array, offset: number): Promise<void>;
  write(buffer: Uint8Array, offset: number): Promise<void>;
  readv(buffers: Uint8Array[], offset: number): Promise<void>;
  writev(buffers: Uint8Array[], offset: number): Promise<void>;
  /** fdatasync, except in cache mode `unsafe`. */
  flush(): Promise<void>;
  allocate(mode: 'allocate' | 'punch' | 'zero', offset: number, length: number): Promise<void>;
  truncate(size: number): Promise<void>;
  size(): Promise<number>;
  /** Bytes the file occupies on disk (st_blocks × 512). */
  allocatedBytes(): Promise<number>;
  /** The next offset ≥ `offset` holding data, or the file size when there is none. */
  seekData(offset: number): Promise<number>;
  /** The next offset ≥ `offset` in a hole, or the file size. */
  seekHole(offset: number): Promise<number>;
  /**
   * The data runs of [offset, end) as [start, end, start, end, …], at most `maxRuns` of them
   * (fewer means none follows before `end`); what lies between them reads as zero.
   */
  dataRuns(offset: number, end: number, maxRuns: number): Promise<Float64Array>;
  close(): Promise<void>;
}

export interface NativeFileConstructor {
  open(path: string, options?: NativeFileOptions): Promise<NativeFile>;
}

/** Header values the qcow2 engine needs (from ts/qcow2/header.ts), plus cache tuning. */
export interface Qcow2EngineParams {
  clusterBits: number;
  /** Virtual disk size in bytes. */
  size: number;
  l1TableOffset: number;
  l1Size: number;
  refcountOrder: number;
  extendedL2?: boolean;
  compressionType?: 'zlib' | 'zstd';
  externalDataFile?: boolean;
  dataFileRaw?: boolean;
  /** Bytes of L2 tables kept in memory (default 32 MiB: 256 GiB of guest data at 64 KiB clusters). */
  l2CacheSize?: number;
  /** Bytes per cached L2 slice, a power of two (default 4096, at most the cluster size). */
  l2SliceSize?: number;
  /** Open for writing: the refcount table fields below are then required. */
  writable?: boolean;
  version?: 2 | 3;
  refcountTableOffset?: number;
  refcountTableClusters?: number;
  /** The incompatible feature bits as stored (the corrupt bit is set beside them). */
  incompatibleFeatures?: number;
  /** Structures decoded in TypeScript that writes must never land on (writable opens). */
  structures?: Qcow2Structure[];
  /** Persistent bitmaps the engine loads and keeps up to date (writable opens of images whose bitmaps are consistent). */
  bitmaps?: Qcow2EngineBitmap[];
  /** Where the header fields the engine updates itself lie (writable opens): ts/qcow2/header.ts HEADER_FIELD_OFFSETS. */
  headerFields?: Qcow2HeaderFields;
}

/** Byte offsets of the header fields native code writes. */
export interface Qcow2HeaderFields {
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  incompatibleFeatures: number;
}

/** A metadata structure's place in the image file, for the engine's overlap check. */
export interface Qcow2Structure {
  kind: 'snapshotTable' | 'inactiveL1' | 'bitmapDirectory';
  offset: number;
  bytes: number;
}

/** A persistent dirty bitmap as its directory entry (ts/qcow2/bitmaps.ts) describes it. */
export interface Qcow2EngineBitmap {
  tableOffset: number;
  tableEntries: number;
  granularityBits: number;
  /** The auto flag: every change of the disk is recorded. */
  enabled: boolean;
}

/** What Qcow2Engine.format() lays out: the structures the header must point at. */
export interface Qcow2FormatParams {
  clusterBits: number;
  refcountOrder: number;
  size: number;
  extendedL2?: boolean;
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
}

/** Where Qcow2Engine.format() put the tables. */
export interface Qcow2FormatResult {
  l1TableOffset: number;
  l1Size: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
}

/** What unallocated clusters of a qcow2 engine read from: another engine or a raw file, up to `size`. */
export type Qcow2EngineBacking = { engine: Qcow2Engine; size: number } | { file: NativeFile; size: number };

/** Kinds in Qcow2Engine.map() results. */
export const enum MapKind {
  Data = 0,
  Zero = 1,
  Unallocated = 2,
}

/** Flags in Qcow2Engine.map() results. */
export const enum MapFlags {
  /** Stored compressed; the host offset is where the compressed bytes start. */
  Compressed = 1,
  /** The host offset is in the external data file of the image at that depth. */
  DataFile = 2,
  /** The image at that depth is a raw file; the host offset is in it. */
  RawFile = 4,
}

/** Numbers per run in Qcow2Engine.map() results. */
export const MAP_RUN_FIELDS = 6;

/** Statistics and geometry of an open engine. */
export interface Qcow2EngineInfo {
  clusterSize: number;
  size: number;
  l2CacheSize: number;
  l2SliceSize: number;
  l2CacheHits: number;
  l2CacheMisses: number;
  l2CachedSlices: number;
  /** Reads served without a worker thread: through io_uring from cached tables, or zeros. */
  directReads: number;
  /** Writes served without a worker thread: through io_uring into clusters the image owns or allocates from memory. */
  directWrites: number;
}

/** The native qcow2 read engine of one image; reads fall through its backing in C++. */
export interface Qcow2Engine {
  readonly info: Qcow2EngineInfo;
  /** Fill `buffer` with guest bytes from `offset` (inside the disk). */
  read(buffer: Uint8Array, offset: number): Promise<void>;
  /**
   * Runs describing [offset, offset + length), MAP_RUN_FIELDS numbers each:
   * offset, length, kind (MapKind), depth, hostOffset (-1 for none), flags (MapFlags).
   * At most `maxRuns` runs (default 65536): they may then cover only a prefix of the range.
   */
  map(offset: number, length: number, maxRuns?: number): Promise<Float64Array>;
  /** Write guest bytes (writable engines); resolves once the mapping showing them is written. */
  write(buffer: Uint8Array, offset: number): Promise<void>;
  /** Make a range read as zeros; whole clusters change their mapping, `unmap` frees their host space. */
  writeZeroes(offset: number, length: number, options?: { unmap?: boolean }): Promise<void>;
  /** Drop the whole clusters of a range, as QEMU's qcow2 discard does. */
  discard(offset: number, length: number): Promise<void>;
  /** Store whole clusters compressed (cluster-aligned offset; whole clusters or up to the disk end). */
  writeCompressed(buffer: Uint8Array, offset: number): Promise<void>;
  /** Everything written before is durable when this resolves. */
  flush(): Promise<void>;
  /** Grow the disk, or with shrink: true shrink it (clusters past the new end are dropped); writes the header size. */
  resize(size: number, options?: { shrink?: boolean; preallocation?: 'off' | 'metadata' | 'falloc' | 'full' }): Promise<void>;
  /** Create, delete or apply an internal snapshot (the table encoded by ts/qcow2/snapshots.ts); every other request waits. */
  changeSnapshots(change: Qcow2SnapshotChange): Promise<{ l1Offset: number; tableOffset: number }>;
  /**
   * Write the bitmaps loaded at open back (data, then tables, flushed), in the order they were given;
   * what their old tables used stays allocated until releaseBitmapClusters().
   */
  storeBitmaps(): Promise<{ tableOffset: number; tableEntries: number }[]>;
  /** The bitmap directory names the stored tables now: free the clusters the old ones used. */
  releaseBitmapClusters(): Promise<void>;
  /** Add an empty bitmap (stored by storeBitmaps()); resolves to its index among the loaded ones. */
  addBitmap(granularityBits: number, enabled: boolean): Promise<number>;
  /** Remove, clear, enable, disable loaded bitmap `index`, or merge `bits` (at `granularityBits`) into it. */
  changeBitmap(index: number, change: 'remove' | 'clear' | 'enable' | 'disable'): Promise<void>;
  changeBitmap(index: number, change: 'merge', bits: Uint8Array, granularityBits: number): Promise<void>;
  /** The bits of loaded bitmap `index` now (bit i of byte j: granule 8j + i). */
  bitmapBits(index: number): Promise<Buffer>;
  /** The bits of the bitmap whose table is given, read from the image (read-only engines too). */
  readBitmap(bitmap: { tableOffset: number; tableEntries: number; granularityBits: number }): Promise<Buffer>;
  /** Free the clusters of a bitmap that was not loaded (in use) with the next releaseBitmapClusters(). */
  dropBitmapTable(tableOffset: number, tableEntries: number): Promise<void>;
  /** Write a new bitmap directory (none when empty), flushed; resolves to its offset. The old one is freed by releaseBitmapClusters(). */
  writeBitmapDirectory(directory: Uint8Array, oldOffset: number, oldBytes: number): Promise<number>;
  /** Flush (when writable), refuse further requests and drop the cached tables; the files stay open. */
  close(): Promise<void>;
}

/** A snapshot change for Qcow2Engine.changeSnapshots(). */
export interface Qcow2SnapshotChange {
  kind: 'create' | 'delete' | 'apply';
  /** delete, apply: the snapshot's L1 table. */
  l1Offset?: number;
  l1Entries?: number;
  /** create, delete: the new snapshot table and its entry count (apply: the count as it is). */
  table?: Buffer;
  count: number;
  /** create: where in `table` the new snapshot's L1 table offset is written. */
  l1OffsetAt?: number;
  /** The snapshot table in use now (freed once the header points at the new one; apply keeps it). */
  oldTableOffset: number;
  oldTableBytes: number;
  /** L1 tables of the snapshots that stay (the one being created left out). */
  keptL1s: { offset: number; entries: number }[];
  /** Header offsets of nb_snapshots and snapshots_offset. */
  countField: number;
  offsetField: number;
}

export interface Qcow2EngineConstructor {
  open(
    file: NativeFile,
    params: Qcow2EngineParams,
    dataFile?: NativeFile | null,
    backing?: Qcow2EngineBacking | null,
  ): Promise<Qcow2Engine>;
  /** Lay out the refcount table and blocks, L1 (and preallocated L2 and data) in an empty image file; the header is the caller's. */
  format(file: NativeFile, params: Qcow2FormatParams, dataFile?: NativeFile | null): Promise<Qcow2FormatResult>;
  /** Count every reference (header, L1/L2 tables, data, snapshot table, bitmaps: the walk check does), write a new refcount structure past the end, point the header at it and clear the dirty bit. */
  rebuildRefcounts(file: NativeFile, params: Qcow2RebuildParams): Promise<{ refcountTableOffset: number; refcountTableClusters: number }>;
  /** One pass of qemu-img check (with `repair`, qemu-img check -r): counts every reference, compares with the refcounts, checks COPIED flags. */
  check(file: NativeFile, params: Qcow2CheckParams): Promise<Qcow2CheckReport>;
}

/** What a check or refcount rebuild walks: the header's tables and what TS decoded of the snapshot table and bitmap directory. */
export interface Qcow2WalkParams {
  clusterBits: number;
  refcountOrder: number;
  extendedL2?: boolean;
  externalDataFile?: boolean;
  /** Virtual disk size in bytes. */
  size?: number;
  l1TableOffset: number;
  l1Size: number;
  /** Every snapshot's L1 table, with the id and name its messages show. */
  snapshots?: { offset: number; entries: number; id: string; name: string }[];
  snapshotsOffset?: number;
  snapshotsBytes?: number;
  refcountTableOffset?: number;
  refcountTableClusters?: number;
  cryptoOffset?: number;
  cryptoBytes?: number;
  /** Present when the image has bitmaps; `valid` false when the directory could not be decoded. A table offset may be a bigint: a table past the end of the file, beyond 2^53. */
  bitmaps?: { directoryOffset: number; directoryBytes: number; valid: boolean; tables: { offset: number | bigint; entries: number }[] };
  /** Where the header fields lie that a repair or rebuild updates (HEADER_FIELD_OFFSETS). */
  headerFields: Qcow2HeaderFields;
}

/** What Qcow2Engine.rebuildRefcounts() walks. */
export interface Qcow2RebuildParams extends Qcow2WalkParams {
  /** The incompatible feature bits as stored (the dirty bit is cleared from them). */
  incompatibleFeatures?: number;
}

/** One pass of Qcow2Engine.check(). */
export interface Qcow2CheckParams extends Qcow2WalkParams {
  repair?: 'leaks' | 'all';
  /** The incompatible feature bits as stored (a clean repair clears dirty and corrupt). */
  incompatibleFeatures?: number;
  /** Corruptions TS found and left unfixed (the snapshot table's): a repair then leaves the image marked as it was. */
  otherCorruptions?: number;
  /** With repair 'all': a snapshot table to write at the first free clusters in place of the old one; the header fields name where nb_snapshots and snapshots_offset lie. */
  snapshotTable?: { bytes: Buffer; count: number; countField: number; offsetField: number };
}

/** What one pass of Qcow2Engine.check() found and fixed; `failure` when it stopped early (strerror text). */
export interface Qcow2CheckReport {
  messages: string[];
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  failure?: string;
  /** A corruption event on the writable image made it unusable for the rest of the run, as in qemu. */
  unusable?: boolean;
}

/** Everything the addon exports. */
export interface NativeAddon {
  NativeFile: NativeFileConstructor;
  Qcow2Engine: Qcow2EngineConstructor;
  /** A zero-filled Buffer over memory aligned to `bufferAlign`, from the addon's pool. */
  allocAligned(size: number): Buffer;
  bufferAlign: number;
  poolThreads: number;
  /**
   * Write rows [0, count) of a map table (ts/tools/map.ts MapTable) as qemu-img map's JSON lines
   * into `out` from `pos`, each after ",\n" unless `first` and the first; returns the new position.
   * `out` needs count × mapJsonLineMax bytes of room from `pos`.
   */
  formatMapJson(
    start: Float64Array,
    length: Float64Array,
    depth: Uint32Array,
    bits: Uint8Array,
    offset: Float64Array,
    count: number,
    out: Buffer,
    pos: number,
    first: boolean,
  ): number;
  /** Bytes one line of formatMapJson() takes at most. */
  mapJsonLineMax: number;
}

/** QCOW2_NATIVE_ADDON names another build of the addon (the sanitizer build of `npm run test:asan`). */
const ADDON_PATH = process.env.QCOW2_NATIVE_ADDON || path.join(__dirname, '..', '..', 'build', 'Release', 'qcow2_native.node');

// eslint-disable-next-line @typescript-eslint/no-require-imports
export const native: NativeAddon = require(ADDON_PATH);

/** A zero-filled Buffer over aligned memory from the addon's pool: the buffer O_DIRECT reads and writes need no bouncing for. */
export const allocAligned = (size: number): Buffer => native.allocAligned(size);
