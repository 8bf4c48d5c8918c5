/**
 * Image information, the object `qemu-img info --output=json` prints. Works from the metadata
 * alone (header, snapshot table, bitmap directory, file sizes): no engine is opened.
 */
import { ErrorCodes, Qcow2Error, asQcow2Error } from '../errors.js';
import type { ImageFormat } from '../image.js';
import { BitmapEntry, readBitmaps } from '../qcow2/bitmaps.js';
import { QCOW2_MAGIC, Qcow2Header, readHeaderFrom } from '../qcow2/header.js';
import { MetadataFile, openMetadataFile, readRange } from '../qcow2/metadata-file.js';
import { SnapshotEntry, readSnapshots } from '../qcow2/snapshots.js';
import { cString, combineFileName, hasProtocol } from '../qcow2/text.js';

/*
 * Key order: qemu-img prints its QDicts in hash-bucket order, which is fixed for a given set of
 * keys. Each object below is built with its keys in the order qemu-img 7.2 prints them, so the
 * objects serialise (and dump as text) in qemu-img's order.
 */

/** One internal snapshot, as in qemu-img's "snapshots" list. */
export interface SnapshotInfo {
  /** Guest instruction count; a bigint only beyond 2^53. Absent when the image does not record it. */
  icount?: number | bigint;
  'vm-clock-nsec': number;
  name: string;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number;
  id: string;
  'vm-state-size': number;
}

/** One persistent bitmap, as in the qcow2 "bitmaps" list. */
export interface BitmapInfo {
  flags: ('in-use' | 'auto')[];
  name: string;
  granularity: number;
}

/** qemu-img's "format-specific" data of a qcow2 image. */
export interface Qcow2SpecificInfo {
  compat: '0.10' | '1.1';
  'compression-type': 'zlib' | 'zstd';
  'lazy-refcounts'?: boolean;
  bitmaps?: BitmapInfo[];
  'refcount-bits': number;
  'data-file'?: string;
  'data-file-raw'?: boolean;
  corrupt?: boolean;
  'extended-l2'?: boolean;
}

/** What `qemu-img info --output=json` prints for one image. */
export interface ImageInfo {
  'backing-filename-format'?: string;
  snapshots?: SnapshotInfo[];
  'virtual-size': number;
  filename: string;
  'cluster-size'?: number;
  format: ImageFormat;
  'actual-size'?: number;
  'format-specific'?: { type: 'qcow2'; data: Qcow2SpecificInfo };
  'full-backing-filename'?: string;
  'backing-filename'?: string;
  'dirty-flag': boolean;
}

/** Options of info() and infoChain(). */
export interface InfoOptions {
  /** The image's format; probed from its first bytes when left out (qcow2 by magic, else raw). */
  format?: string;
  /** infoChain only: the longest chain accepted, counting the top image (default 65). */
  maxChainDepth?: number;
  /** Called with the warnings qemu-img prints on stderr (e.g. inconsistent bitmaps). */
  onWarning?: (message: string) => void;
}

/**
 * The longest chain infoChain accepts by default: an image and 64 backing files, the depth open()
 * accepts. (Kept here rather than imported so that info never loads the native addon.)
 */
export const DEFAULT_MAX_CHAIN_IMAGES = 65;

/** Warning qemu-img gives for a bitmaps extension without its autoclear bit. */
export const INCONSISTENT_BITMAPS_WARNING =
  'a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent';

/** The format named by -f or a backing format extension; only raw and qcow2 exist here. */
function knownFormat(name: string): ImageFormat {
  if (name === 'raw' || name === 'qcow2') return name;
  throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `Unknown driver '${name}'`);
}

async function probe(file: MetadataFile): Promise<ImageFormat> {
  if (file.size < 4) return 'raw';
  const magic = await readRange(file, 0, 4, 'format magic');
  return magic.readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
}

function snapshotInfo(s: SnapshotEntry): SnapshotInfo {
  const out: Partial<SnapshotInfo> = {};
  if (s.icount !== undefined) out.icount = s.icount <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(s.icount) : BigInt.asIntN(64, s.icount);
  out['vm-clock-nsec'] = Number(s.vmClockNsec % 1_000_000_000n);
  out.name = cString(s.name);
  out['date-sec'] = s.dateSec;
  out['date-nsec'] = s.dateNsec;
  out['vm-clock-sec'] = Number(s.vmClockNsec / 1_000_000_000n);
  out.id = cString(s.id);
  out['vm-state-size'] = s.vmStateSize;
  return out as SnapshotInfo;
}

function bitmapInfo(b: BitmapEntry): BitmapInfo {
  const flags: BitmapInfo['flags'] = [];
  if (b.inUse) flags.push('in-use');
  if (b.auto) flags.push('auto');
  return { flags, name: cString(b.name), granularity: b.granularity };
}

function qcow2Specific(h: Qcow2Header, bitmaps: BitmapEntry[] | undefined): Qcow2SpecificInfo {
  const data: Partial<Qcow2SpecificInfo> = { compat: h.version === 2 ? '0.10' : '1.1', 'compression-type': h.compressionType };
  if (h.version === 3) data['lazy-refcounts'] = h.lazyRefcounts;
  if (bitmaps) data.bitmaps = bitmaps.map(bitmapInfo);
  data['refcount-bits'] = 2 ** h.refcountOrder;
  if (h.dataFile !== undefined) data['data-file'] = cString(h.dataFile);
  if (h.externalDataFile) data['data-file-raw'] = h.dataFileRaw;
  if (h.version === 3) {
    data.corrupt = h.corrupt;
    data['extended-l2'] = h.extendedL2;
  }
  return data as Qcow2SpecificInfo;
}

async function qcow2Info(file: MetadataFile, options: InfoOptions): Promise<ImageInfo> {
  const header = await readHeaderFrom(file);
  const snapshots = header.nbSnapshots > 0 ? (await readSnapshots(file, header)).entries : [];
  let bitmaps: BitmapEntry[] | undefined;
  if (header.bitmaps && !header.bitmapsAutoclear) {
    options.onWarning?.(INCONSISTENT_BITMAPS_WARNING);
  } else if (header.bitmaps) {
    bitmaps = await readBitmaps(file, header);
  }
  const info: Partial<ImageInfo> = {};
  const backing = header.backingFile === undefined ? undefined : cString(header.backingFile);
  if (backing && header.backingFormat !== undefined) info['backing-filename-format'] = cString(header.backingFormat);
  if (snapshots.length > 0) info.snapshots = snapshots.map(snapshotInfo);
  // qemu works in 512-byte sectors: a size that is not a multiple shows rounded down.
  info['virtual-size'] = header.size - (header.size % 512);
  info.filename = file.path;
  info['cluster-size'] = header.clusterSize;
  info.format = 'qcow2';
  info['actual-size'] = file.allocated;
  info['format-specific'] = { type: 'qcow2', data: qcow2Specific(header, bitmaps) };
  if (backing) {
    info['full-backing-filename'] = combineFileName(file.path, backing);
    info['backing-filename'] = backing;
  }
  info['dirty-flag'] = header.dirty;
  return info as ImageInfo;
}

function rawInfo(file: MetadataFile): ImageInfo {
  // qemu's raw driver rounds the file size up to whole 512-byte sectors.
  return {
    'virtual-size': Math.ceil(file.size / 512) * 512,
    filename: file.path,
    format: 'raw',
    'actual-size': file.allocated,
    'dirty-flag': false,
  };
}

/** Info of one open file; also returns its identity for loop detection. */
async function infoOf(path: string, format: string | undefined, options: InfoOptions): Promise<{ info: ImageInfo; identity: string }> {
  try {
    const wanted = format === undefined ? undefined : knownFormat(format);
    const file = await openMetadataFile(path);
    try {
      const kind = wanted ?? (await probe(file));
      const info = kind === 'qcow2' ? await qcow2Info(file, options) : rawInfo(file);
      return { info, identity: file.identity };
    } finally {
      await file.handle.close();
    }
  } catch (error) {
    const e = asQcow2Error(error);
    throw new Qcow2Error(e.code, `Could not open '${path}': ${e.message}`, { cause: e });
  }
}

/** What `qemu-img info --output=json IMG` prints, as an object. */
export async function info(path: string, options: InfoOptions = {}): Promise<ImageInfo> {
  checkPath(path);
  return (await infoOf(path, options.format, options)).info;
}

/**
 * What `qemu-img info --backing-chain --output=json IMG` prints: the image and each backing file
 * below it. A chain that comes back to one of its files, or grows past `maxChainDepth`, is refused.
 */
export async function infoChain(path: string, options: InfoOptions = {}): Promise<ImageInfo[]> {
  checkPath(path);
  const maxDepth = options.maxChainDepth ?? DEFAULT_MAX_CHAIN_IMAGES;
  if (!Number.isSafeInteger(maxDepth) || maxDepth < 1) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `maxChainDepth must be a positive integer, got ${maxDepth}`);
  }
  const chain: ImageInfo[] = [];
  const seen = new Map<string, string>();
  let next: { path: string; format: string | undefined } | undefined = { path, format: options.format };
  while (next) {
    if (chain.length === maxDepth) {
      throw new Qcow2Error(ErrorCodes.CHAIN_TOO_DEEP, `backing chain of '${path}' is deeper than ${maxDepth} images`);
    }
    const { info: image, identity } = await infoOf(next.path, next.format, options);
    const earlier = seen.get(identity);
    if (earlier !== undefined) {
      const as = earlier === next.path ? '' : ` (as '${earlier}')`;
      const parent = chain[chain.length - 1].filename;
      throw new Qcow2Error(ErrorCodes.BACKING_LOOP, `Backing file loop: '${parent}' has backing file '${next.path}', which is already in the chain${as}`);
    }
    seen.set(identity, next.path);
    chain.push(image);
    const backing = image['full-backing-filename'];
    next = backing === undefined ? undefined : { path: localPath(backing), format: image['backing-filename-format'] };
  }
  return chain;
}

/** The file a backing name opens: "file:" names a local file; other protocols are not supported here. */
function localPath(name: string): string {
  if (!hasProtocol(name)) return name;
  if (name.startsWith('file:')) return name.slice('file:'.length);
  throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `Could not open '${name}': protocol '${name.slice(0, name.indexOf(':'))}' is not supported`);
}

function checkPath(path: string): void {
  if (typeof path !== 'string' || path === '') {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, 'info: path must be a non-empty string');
  }
}
