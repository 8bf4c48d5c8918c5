/**
 * How large a new image would be (library side of `qcow2 measure`): the figures qemu-img 7.2
 * prints, for raw and qcow2 targets, from a virtual size or from an existing image.
 */
import { ErrorCodes, Qcow2Error, check, settle } from '../errors.js';
import type { Extent, Image, ImageFormat } from '../image.js';
import { NativeFile, native } from '../native.js';
import { probeFormat } from '../open.js';
import { readBitmaps } from '../qcow2/bitmaps.js';
import { align8 } from '../qcow2/extensions.js';
import { MAX_L1_BYTES, readHeader } from '../qcow2/header.js';
import { Qcow2Image } from '../qcow2/image.js';
import { openMetadataFile } from '../qcow2/metadata-file.js';
import { openQcow2 } from '../qcow2/open.js';
import { SnapshotEntry, readSnapshots } from '../qcow2/snapshots.js';
import type { Preallocation } from './create.js';

/** The largest size qemu accepts (INT64_MAX). */
export const MAX_MEASURE_SIZE = (1n << 63n) - 1n;

const L1_ENTRY = 8n;
const REFTABLE_ENTRY = 8n;
/** A bitmap directory entry's fixed part. */
const BITMAP_DIR_ENTRY = 24;
/** A bitmap table entry. */
const BITMAP_TABLE_ENTRY = 8n;

/** What the new image would be and where its contents come from. */
export interface MeasureOptions {
  /** Format of the image to be made: 'raw' (default) or 'qcow2'. */
  outputFormat?: ImageFormat;
  /**
   * Virtual size of the new image when no source image is given (bytes, up to 2^63 - 1; a bigint
   * for sizes past 2^53). With a source it only feeds qemu's "image size is too large" check.
   */
  size?: number | bigint;
  /** qcow2: cluster size, a power of two from 512 to 2 MiB (default 65536). */
  clusterSize?: number;
  /** qcow2: refcount width, a power of two up to 64 (default 16; compat '0.10' allows only 16). */
  refcountBits?: number;
  /** qcow2: extended L2 entries (16-byte entries; clusters of at least 16 KiB). */
  extendedL2?: boolean;
  /** qcow2: '1.1' (default) or '0.10'; persistent bitmaps are only counted for '1.1'. */
  compat?: '0.10' | '1.1';
  /** qcow2: 'falloc' and 'full' count every data cluster as required. */
  preallocation?: Preallocation;
  /** qcow2: the new image would have a backing file, so every cluster of the source counts as required. */
  backingFile?: string;
  /** qcow2: encryption format; 'luks' would add the LUKS header, which needs a secret this package cannot take: refused. */
  encryptFormat?: string;
  /** qcow2: the id of the LUKS key secret (qemu's encrypt.key-secret). */
  encryptKeySecret?: string;
}

/** The figures qemu-img measure prints, in bytes (bigints: a 2 MiB-cluster qcow2 image may exceed 2^53). */
export interface MeasureResult {
  /** File size the new image needs for the source's data (or an empty image of `size`). */
  required: bigint;
  /** File size of the image with every cluster allocated. */
  fullyAllocated: bigint;
  /** Space the source's persistent bitmaps would take; present when source and target both keep bitmaps. */
  bitmaps?: bigint;
}

function invalid(message: string): Qcow2Error {
  return new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, message);
}

function ceilDiv(a: bigint, b: bigint): bigint {
  return (a + b - 1n) / b;
}

function roundUp(a: bigint, b: bigint): bigint {
  return ceilDiv(a, b) * b;
}

/** The size option as a bigint in [0, 2^63 - 1]. */
function sizeOption(size: number | bigint | undefined): bigint {
  if (size === undefined) return 0n;
  const value = typeof size === 'bigint' ? size : Number.isSafeInteger(size) ? BigInt(size) : -1n;
  check(value >= 0n && value <= MAX_MEASURE_SIZE, `measure: size must be an integer from 0 to ${MAX_MEASURE_SIZE}, got ${size}`);
  return value;
}

/**
 * Measure the image that would be made of `source` (or, without one, an empty image of
 * `options.size` bytes) in `options.outputFormat`. Options are checked in qemu's order and wording.
 */
export async function measure(source: Image | undefined, options: MeasureOptions = {}): Promise<MeasureResult> {
  const format = options.outputFormat ?? 'raw';
  check(format === 'raw' || format === 'qcow2', `measure: unknown output format '${format as string}' (raw, qcow2)`);
  const size = sizeOption(options.size);
  if (format === 'raw') {
    const required = source ? BigInt(source.size) : roundUp(size, 512n);
    return { required, fullyAllocated: required };
  }
  return measureQcow2(source, size, options);
}

/** The qcow2 options resolved and checked as qemu's qcow2 driver checks them when measuring. */
interface Qcow2Layout {
  clusterSize: bigint;
  refcountBits: bigint;
  extendedL2: boolean;
  version: 2 | 3;
}

function qcow2Layout(options: MeasureOptions): Qcow2Layout {
  const extendedL2 = options.extendedL2 ?? false;
  const clusterSize = options.clusterSize ?? 65536;
  if (!isPowerOfTwo(clusterSize) || clusterSize < 512 || clusterSize > 2 << 20) {
    throw invalid('Cluster size must be a power of two between 512 and 2048k');
  }
  if (extendedL2 && clusterSize < 16384) {
    throw invalid('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  }
  const compat = options.compat ?? '1.1';
  if (compat !== '0.10' && compat !== '1.1') throw invalid(`Invalid compatibility level: '${compat as string}'`);
  const version = compat === '1.1' ? 3 : 2;
  const refcountBits = options.refcountBits ?? 16;
  if (!isPowerOfTwo(refcountBits) || refcountBits > 64) throw invalid('Refcount width must be a power of two and may not exceed 64 bits');
  if (version < 3 && refcountBits !== 16) {
    throw invalid('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  const preallocation = options.preallocation ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(preallocation)) throw invalid(`invalid parameter value: ${preallocation}`);
  if (options.encryptFormat === 'luks') {
    if (options.encryptKeySecret === undefined) throw invalid("Parameter 'encrypt.key-secret' is required for cipher");
    throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `No secret with id '${options.encryptKeySecret}'`);
  }
  return { clusterSize: BigInt(clusterSize), refcountBits: BigInt(refcountBits), extendedL2, version };
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

async function measureQcow2(source: Image | undefined, size: bigint, options: MeasureOptions): Promise<MeasureResult> {
  const layout = qcow2Layout(options);
  const { clusterSize } = layout;
  let virtualSize = roundUp(size, clusterSize);
  const l2Entry = layout.extendedL2 ? 16n : 8n;
  const l2Tables = ceilDiv(virtualSize / clusterSize, clusterSize / l2Entry);
  if (l2Tables * L1_ENTRY > BigInt(MAX_L1_BYTES)) throw invalid('The image size is too large (try using a larger cluster size)');
  let required = 0n;
  if (source) {
    virtualSize = roundUp(BigInt(source.size), clusterSize);
    // The new image's backing file may share nothing with the source: every cluster may need writing.
    required = options.backingFile !== undefined ? virtualSize : await clustersWithData(source, clusterSize);
  }
  const preallocation = options.preallocation ?? 'off';
  if (preallocation === 'falloc' || preallocation === 'full') required = virtualSize;
  const fullyAllocated = fullyAllocatedSize(virtualSize, layout);
  const result: MeasureResult = { required: fullyAllocated - virtualSize + required, fullyAllocated };
  if (layout.version >= 3 && source instanceof Qcow2Image && source.header.version >= 3) {
    result.bitmaps = await bitmapsSize(source, clusterSize);
  }
  return result;
}

/**
 * Bytes of the clusters (of the new image) that hold data of `source`, its backing chain
 * included; zero and unallocated runs need none. A data run counts from the start of its first
 * cluster to the end of its last, and the next run is looked at from there on, as qemu does.
 */
async function clustersWithData(source: Image, clusterSize: bigint): Promise<bigint> {
  const cs = Number(clusterSize);
  let required = 0n;
  let next = 0;
  const files = new HostFiles();
  try {
    for await (const extent of source.extents()) {
      if (extent.kind !== 'data' || extent.offset + extent.length <= next) continue;
      for (const [offset, end] of await files.dataIn(extent)) {
        const start = Math.max(offset, next);
        if (start >= end) continue;
        const first = start - (start % cs);
        next = Math.ceil(end / cs) * cs;
        required += BigInt(next - first);
      }
    }
  } finally {
    await files.close();
  }
  return required;
}

/**
 * The qcow2 files under data clusters, opened on demand. qemu asks the file under a data cluster
 * whether it holds data there when it takes the image for a metadata-preallocated one: then
 * clusters over a hole in the file read as zero and need no space.
 */
class HostFiles {
  #files = new Map<string, Promise<NativeFile | undefined>>();

  /** The guest ranges of a data extent that qemu counts as data. */
  async dataIn(extent: Extent): Promise<Array<[number, number]>> {
    const whole: Array<[number, number]> = [[extent.offset, extent.offset + extent.length]];
    if (extent.hostOffset === undefined || extent.file === undefined || extent.compressed) return whole;
    const file = await this.#preallocated(extent.file);
    if (!file) return whole;
    const size = await settle(file.size());
    const shift = extent.offset - extent.hostOffset;
    const end = Math.min(extent.hostOffset + extent.length, size);
    const ranges: Array<[number, number]> = [];
    for (let pos = extent.hostOffset; pos < end; ) {
      const data = Math.min(await settle(file.seekData(pos)), end);
      if (data >= end) break;
      const hole = Math.min(await settle(file.seekHole(data)), end);
      ranges.push([data + shift, hole + shift]);
      pos = hole;
    }
    return ranges;
  }

  /** The file at `path` when it is a qcow2 image qemu would take for metadata-preallocated, else undefined. */
  #preallocated(path: string): Promise<NativeFile | undefined> {
    let file = this.#files.get(path);
    if (!file) {
      file = this.#openIfPreallocated(path);
      this.#files.set(path, file);
    }
    return file;
  }

  /**
   * qemu's test: the clusters in use (here: every cluster up to the end of the file) reach
   * 10/9 of (and 2 more than) the clusters the file really occupies on disk.
   */
  async #openIfPreallocated(path: string): Promise<NativeFile | undefined> {
    if ((await probeFormat(path)) !== 'qcow2') return undefined;
    const { header } = await readHeader(path);
    const file = await settle(native.NativeFile.open(path, { writable: false, cache: 'writeback' }));
    const clusters = Math.ceil((await settle(file.size())) / header.clusterSize);
    const occupied = Math.floor((await settle(file.allocatedBytes())) / header.clusterSize);
    if (clusters >= Math.max(Math.floor((occupied * 10) / 9), occupied + 2)) return file;
    await file.close();
    return undefined;
  }

  async close(): Promise<void> {
    for (const file of await Promise.allSettled(this.#files.values())) {
      if (file.status === 'fulfilled') await file.value?.close();
    }
  }
}

/**
 * Bytes of refcount blocks and table needed to count `clusters` clusters and themselves: the
 * fixed point where counting the refcount structures needs no further cluster.
 */
export function refcountMetadataSize(clusters: bigint, clusterSize: bigint, refcountBits: bigint): bigint {
  const blocksPerTableCluster = clusterSize / REFTABLE_ENTRY;
  const refcountsPerBlock = (clusterSize * 8n) / refcountBits;
  let table = 0n;
  let blocks = 0n;
  let total = 0n;
  let last: bigint;
  do {
    last = total;
    blocks = ceilDiv(clusters + table + blocks, refcountsPerBlock);
    table = ceilDiv(blocks, blocksPerTableCluster);
    total = clusters + blocks + table;
  } while (total !== last);
  return (blocks + table) * clusterSize;
}

/** File size of a qcow2 image of `virtualSize` bytes with every cluster and table allocated. */
function fullyAllocatedSize(virtualSize: bigint, layout: Qcow2Layout): bigint {
  const { clusterSize } = layout;
  const l2Entry = layout.extendedL2 ? 16n : 8n;
  const data = roundUp(virtualSize, clusterSize);
  let metadata = clusterSize; // the header
  const l2Entries = roundUp(data / clusterSize, clusterSize / l2Entry);
  metadata += l2Entries * l2Entry;
  const l1Entries = roundUp((l2Entries * l2Entry) / clusterSize, clusterSize / L1_ENTRY);
  metadata += l1Entries * L1_ENTRY;
  metadata += refcountMetadataSize((metadata + data) / clusterSize, clusterSize, layout.refcountBits);
  return metadata + data;
}

/**
 * Space for the persistent bitmaps of `source` in an image of `clusterSize` clusters: every
 * bitmap fully allocated, its table, and the directory. qemu ignores the bitmaps of an image
 * whose bitmaps autoclear bit is clear.
 */
async function bitmapsSize(source: Qcow2Image, clusterSize: bigint): Promise<bigint> {
  const header = source.header;
  if (!header.bitmaps || header.bitmaps.nbBitmaps === 0 || !header.bitmapsAutoclear) return 0n;
  const metadata = await openMetadataFile(source.path);
  let bitmaps;
  try {
    bitmaps = await readBitmaps(metadata, header);
  } finally {
    await metadata.handle.close();
  }
  let total = 0n;
  let directory = 0;
  for (const bitmap of bitmaps) {
    const bytes = ceilDiv(ceilDiv(BigInt(source.size), BigInt(bitmap.granularity)), 8n);
    const clusters = ceilDiv(bytes, clusterSize);
    total += clusters * clusterSize + roundUp(clusters * BITMAP_TABLE_ENTRY, clusterSize);
    directory += align8(BITMAP_DIR_ENTRY + Buffer.byteLength(bitmap.name, 'utf8'));
  }
  return total + roundUp(BigInt(directory), clusterSize);
}

/** Which internal snapshot to read: by id, by name, or by both (then both must match). */
export interface SnapshotSelector {
  id?: string;
  name?: string;
}

/** How openAtSnapshot opens the image. */
export interface SnapshotOpenOptions {
  /** The image's format (probed when left out); raw images have no snapshots. */
  format?: ImageFormat;
  /** Follow the backing and data file names the image records (default false, as open(); the CLI sets it). */
  followFileNames?: boolean;
}

/** The snapshot `selector` names: a string is tried as an id first, then as a name, as qemu-img -l does. */
export function findSnapshot(entries: readonly SnapshotEntry[], selector: SnapshotSelector | string): SnapshotEntry | undefined {
  if (typeof selector === 'string') {
    return entries.find((e) => e.id === selector) ?? entries.find((e) => e.name === selector);
  }
  return entries.find(
    (e) => (selector.id === undefined || e.id === selector.id) && (selector.name === undefined || e.name === selector.name),
  );
}

/** Open `path` read-only as its internal snapshot `selector` left the disk (qemu's temporary snapshot load). */
export async function openAtSnapshot(path: string, selector: SnapshotSelector | string, options: SnapshotOpenOptions = {}): Promise<Image> {
  const format = options.format ?? (await probeFormat(path));
  if (format !== 'qcow2') {
    throw new Qcow2Error(
      ErrorCodes.UNSUPPORTED,
      `Block format '${format}' used by device '' does not support temporarily loading internal snapshots`,
    );
  }
  const { header } = await readHeader(path);
  const metadata = await openMetadataFile(path);
  let entries: SnapshotEntry[];
  try {
    entries = (await readSnapshots(metadata, header)).entries;
  } finally {
    await metadata.handle.close();
  }
  const snapshot = findSnapshot(entries, selector);
  if (!snapshot) throw new Qcow2Error('ENOENT', "Can't find snapshot");
  return openQcow2(path, {
    readOnly: true,
    cache: 'writeback',
    followFileNames: options.followFileNames ?? false,
    snapshot: { l1TableOffset: snapshot.l1TableOffset, l1Size: snapshot.l1Size },
  });
}
