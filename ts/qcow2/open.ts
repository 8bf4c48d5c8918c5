/** Opening qcow2 images: header, data file, backing chain and the native engine. */
import { realpath, stat } from 'node:fs/promises';

import { ErrorCodes, Qcow2Error, asQcow2Error, settle } from '../errors.js';
import type { Image } from '../image.js';
import { CacheMode, NativeFile, Qcow2EngineBacking, Qcow2EngineParams, Qcow2Structure, native } from '../native.js';
import { DEFAULT_MAX_CHAIN_DEPTH, OpenOptions, checkOpenOptions, probeFormat } from '../open.js';
import { RawImage } from '../raw.js';
import { BitmapTracking } from './bitmap-tracking.js';
import { HEADER_FIELD_OFFSETS, Qcow2Header, clearUnknownAutoclear, readHeader } from './header.js';
import { Qcow2Image } from './image.js';
import { openMetadataFile } from './metadata-file.js';
import { readSnapshots } from './snapshots.js';
import { cString, combineFileName } from './text.js';
import { walkParams } from './walk.js';

/** Where an image sits in the chain being opened. */
interface ChainState {
  /** 0 for the image asked for, 1 for its backing file, … */
  depth: number;
  /** Real paths of the images above, to refuse loops. */
  seen: Set<string>;
}

/** Options of qcow2 images beyond those every format takes. */
export interface Qcow2OpenOptions extends OpenOptions {
  /** Bytes of L2 tables each image of the chain keeps in memory (default 32 MiB: 256 GiB of guest data at 64 KiB clusters). */
  l2CacheSize?: number;
  /** Bytes per cached L2 slice: a power of two from 512 to 2 MiB (default 4096; whole tables when the cluster is smaller). */
  l2SliceSize?: number;
  /** Read the disk as an internal snapshot left it (its L1 table, from readSnapshots); read-only opens only. */
  snapshot?: { l1TableOffset: number; l1Size: number };
  /**
   * A writable open keeps the persistent bitmaps valid (autoclear bit 0) instead of clearing it: only
   * for callers that change no guest data (snapshot create and delete), which bitmaps do not describe.
   */
  keepBitmaps?: boolean;
}

/** Open the qcow2 image at `path` (and, when allowed, its data file and backing chain). */
export async function openQcow2(imagePath: string, options: Qcow2OpenOptions = {}): Promise<Qcow2Image> {
  checkOpenOptions(options);
  checkCacheOptions(options);
  return openMember(imagePath, options, { depth: 0, seen: new Set() });
}

function checkCacheOptions(options: Qcow2OpenOptions): void {
  const { l2CacheSize, l2SliceSize } = options;
  if (l2CacheSize !== undefined && !(Number.isSafeInteger(l2CacheSize) && l2CacheSize >= 512)) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `l2CacheSize must be an integer of at least 512 bytes, got ${l2CacheSize}`);
  }
  const powerOfTwo = l2SliceSize !== undefined && Number.isSafeInteger(l2SliceSize) && (l2SliceSize & (l2SliceSize - 1)) === 0;
  if (l2SliceSize !== undefined && !(powerOfTwo && l2SliceSize >= 512 && l2SliceSize <= 2 << 20)) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `l2SliceSize must be a power of two from 512 to 2097152, got ${l2SliceSize}`);
  }
}

/**
 * A file name from the image, resolved against the image's directory like qemu-img does. qemu
 * reads the name as a C string, so it ends at its first NUL byte (Node refuses paths holding one).
 */
function resolveName(imagePath: string, name: string): string {
  return combineFileName(imagePath, cString(name));
}

/** Refuse a named file that is neither a regular file nor a block device: opening a FIFO would hang. */
async function checkNamedFile(imagePath: string, file: string): Promise<void> {
  let info;
  try {
    info = await stat(file);
  } catch (error) {
    throw asQcow2Error(error);
  }
  if (!info.isFile() && !info.isBlockDevice()) {
    throw new Qcow2Error(
      ErrorCodes.INVALID_ARGUMENT,
      `'${file}', named by image '${imagePath}', is not a regular file or a block device`,
    );
  }
}

async function realPathOf(file: string): Promise<string> {
  try {
    return await realpath(file);
  } catch (error) {
    throw asQcow2Error(error);
  }
}

/** Refuse to follow file names the image carries unless the caller allowed it. */
function checkFileNames(imagePath: string, header: Qcow2Header, options: Qcow2OpenOptions): void {
  if (options.followFileNames) return;
  const named =
    header.externalDataFile && header.dataFile !== undefined
      ? `the external data file '${header.dataFile}'`
      : header.backingFile !== undefined && options.backing !== false
        ? `the backing file '${header.backingFile}'`
        : undefined;
  if (named) {
    throw new Qcow2Error(
      ErrorCodes.FILE_NAME_NOT_ALLOWED,
      `image '${imagePath}' names ${named}; pass { followFileNames: true } to open it` +
        (named.includes('backing') ? ' (or { backing: false } to read without it)' : ''),
    );
  }
}

/** Refuse what cannot be opened the way it was asked for. */
function checkOpenable(imagePath: string, header: Qcow2Header, readOnly: boolean): void {
  if (header.externalDataFile && header.dataFile === undefined) {
    throw new Qcow2Error(
      ErrorCodes.INVALID_HEADER,
      `image '${imagePath}' keeps its data in an external data file but does not name it`,
    );
  }
  if (readOnly) return;
  if (header.corrupt) {
    throw new Qcow2Error(ErrorCodes.CORRUPT, `image '${imagePath}' is marked corrupt; it can only be opened read-only`);
  }
}

function engineParams(
  header: Qcow2Header,
  options: Qcow2OpenOptions,
  structures: Qcow2Structure[] | undefined,
  bitmaps: BitmapTracking | undefined,
): Qcow2EngineParams {
  return {
    ...(options.l2CacheSize !== undefined ? { l2CacheSize: options.l2CacheSize } : {}),
    ...(options.l2SliceSize !== undefined ? { l2SliceSize: options.l2SliceSize } : {}),
    clusterBits: header.clusterBits,
    size: header.size,
    l1TableOffset: header.l1TableOffset,
    l1Size: header.l1Size,
    refcountOrder: header.refcountOrder,
    extendedL2: header.extendedL2,
    compressionType: header.compressionType,
    externalDataFile: header.externalDataFile,
    dataFileRaw: header.dataFileRaw,
    ...(structures
      ? {
          writable: true,
          version: header.version,
          refcountTableOffset: header.refcountTableOffset,
          refcountTableClusters: header.refcountTableClusters,
          incompatibleFeatures: Number(header.incompatibleFeatures),
          structures,
          headerFields: HEADER_FIELD_OFFSETS,
          ...(bitmaps ? { bitmaps: bitmaps.engineBitmaps() } : {}),
        }
      : {}),
  };
}

/** Where the structures decoded here lie (snapshot table, snapshot L1 tables, bitmap directory): writes must not land on them. */
async function decodedStructures(imagePath: string, header: Qcow2Header): Promise<Qcow2Structure[]> {
  const structures: Qcow2Structure[] = [];
  if (header.nbSnapshots > 0) {
    const metadata = await openMetadataFile(imagePath);
    try {
      const snapshots = await readSnapshots(metadata, header);
      structures.push({ kind: 'snapshotTable', offset: header.snapshotsOffset, bytes: snapshots.byteLength });
      for (const e of snapshots.entries) structures.push({ kind: 'inactiveL1', offset: e.l1TableOffset, bytes: e.l1Size * 8 });
    } finally {
      await metadata.handle.close();
    }
  }
  const bitmaps = header.bitmaps;
  if (bitmaps && bitmaps.bitmapDirectorySize > 0) {
    structures.push({ kind: 'bitmapDirectory', offset: bitmaps.bitmapDirectoryOffset, bytes: bitmaps.bitmapDirectorySize });
  }
  return structures;
}

/**
 * An image left dirty (lazy refcounts, no clean close) gets its refcounts counted again from every
 * L1 table before anything is written; the engine clears the dirty bit once they are on disk.
 */
async function rebuildRefcounts(imagePath: string, file: NativeFile, header: Qcow2Header): Promise<Qcow2Header> {
  const walk = await walkParams(imagePath, header);
  await settle(native.Qcow2Engine.rebuildRefcounts(file, { ...walk, incompatibleFeatures: Number(header.incompatibleFeatures) }));
  return (await readHeader(imagePath)).header;
}

/**
 * A writable open clears the autoclear bits this package does not keep valid: unknown ones, and the
 * bitmaps bit unless the bitmaps are kept up to date or `keepBitmaps`, as the spec asks of any writer.
 */
async function clearAutoclear(file: NativeFile, header: Qcow2Header, keepBitmaps: boolean): Promise<Qcow2Header> {
  const cleared = clearUnknownAutoclear(header, keepBitmaps ? 3n : 2n);
  if (header.version < 3 || cleared.autoclearFeatures === header.autoclearFeatures) return header;
  const field = Buffer.alloc(8);
  field.writeBigUInt64BE(cleared.autoclearFeatures);
  await settle(file.write(field, HEADER_FIELD_OFFSETS.autoclearFeatures));
  await settle(file.flush());
  return cleared;
}

/** The header with a snapshot's L1 table in place of the active one (qemu's temporary snapshot load). */
function snapshotView(imagePath: string, header: Qcow2Header, snapshot: { l1TableOffset: number; l1Size: number }, readOnly: boolean): Qcow2Header {
  if (!readOnly) throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `'${imagePath}': a snapshot can only be opened read-only`);
  return { ...header, l1TableOffset: snapshot.l1TableOffset, l1Size: snapshot.l1Size };
}

async function openMember(imagePath: string, options: Qcow2OpenOptions, state: ChainState): Promise<Qcow2Image> {
  const real = await realPathOf(imagePath);
  if (state.seen.has(real)) {
    throw new Qcow2Error(ErrorCodes.BACKING_LOOP, `backing chain loops: '${imagePath}' is already in the chain`);
  }
  let { header } = await readHeader(imagePath);
  const readOnly = state.depth > 0 || (options.readOnly ?? false);
  checkOpenable(imagePath, header, readOnly);
  checkFileNames(imagePath, header, options);
  const cache = (state.depth > 0 ? options.backingCache : undefined) ?? options.cache ?? 'none';
  const opened: { close(): Promise<void> }[] = [];
  try {
    const file = await openFile(imagePath, readOnly, cache, opened);
    if (!readOnly && header.dirty) header = await rebuildRefcounts(imagePath, file, header);
    const bitmaps = readOnly ? undefined : await BitmapTracking.load(imagePath, header);
    if (!readOnly) header = await clearAutoclear(file, header, bitmaps !== undefined || (options.keepBitmaps ?? false));
    let dataFile: { file: NativeFile; path: string } | undefined;
    if (header.externalDataFile && header.dataFile !== undefined) {
      const dataPath = resolveName(imagePath, header.dataFile);
      await checkNamedFile(imagePath, dataPath);
      dataFile = { file: await openFile(dataPath, readOnly, cache, opened), path: dataPath };
    }
    let backing: Image | undefined;
    if (header.backingFile !== undefined && options.backing !== false) {
      const seen = new Set(state.seen).add(real);
      backing = await openBacking(imagePath, header, options, { depth: state.depth + 1, seen });
      opened.push(backing);
    }
    const structures = readOnly ? undefined : await decodedStructures(imagePath, header);
    const active = state.depth === 0 && options.snapshot ? snapshotView(imagePath, header, options.snapshot, readOnly) : header;
    const engine = await settle(
      native.Qcow2Engine.open(file, engineParams(active, options, structures, bitmaps), dataFile?.file, engineBacking(backing)),
    );
    try {
      await bitmaps?.markInUse(file);
    } catch (error) {
      await Promise.allSettled([engine.close()]);
      throw error;
    }
    return new Qcow2Image({ path: imagePath, readOnly, header, engine, file, dataFile, backing, bitmaps });
  } catch (error) {
    await Promise.allSettled(opened.map((o) => o.close()));
    throw asQcow2Error(error);
  }
}

async function openFile(
  file: string,
  readOnly: boolean,
  cache: CacheMode,
  opened: { close(): Promise<void> }[],
): Promise<NativeFile> {
  const handle = await settle(native.NativeFile.open(file, { writable: !readOnly, cache }));
  opened.push(handle);
  return handle;
}

/** The backing image of `imagePath`, opened read-only in its format. */
async function openBacking(imagePath: string, header: Qcow2Header, options: Qcow2OpenOptions, state: ChainState): Promise<Image> {
  const maxDepth = options.maxChainDepth ?? DEFAULT_MAX_CHAIN_DEPTH;
  if (state.depth > maxDepth) {
    throw new Qcow2Error(
      ErrorCodes.CHAIN_TOO_DEEP,
      `backing chain of '${imagePath}' is deeper than the limit of ${maxDepth} (maxChainDepth)`,
    );
  }
  const backingPath = resolveName(imagePath, header.backingFile!);
  await checkNamedFile(imagePath, backingPath);
  const format = (state.depth === 1 ? options.backingFormat : undefined) ?? header.backingFormat ?? (await probeFormat(backingPath));
  if (format === 'qcow2') return openMember(backingPath, options, state);
  if (format === 'raw') {
    const real = await realPathOf(backingPath);
    if (state.seen.has(real)) {
      throw new Qcow2Error(ErrorCodes.BACKING_LOOP, `backing chain loops: '${backingPath}' is already in the chain`);
    }
    return RawImage.open(backingPath, { readOnly: true, cache: options.backingCache ?? options.cache ?? 'none' });
  }
  throw new Qcow2Error(
    ErrorCodes.UNSUPPORTED,
    `backing file '${backingPath}' of '${imagePath}' has format '${format as string}' (only qcow2 and raw are supported)`,
  );
}

function engineBacking(backing: Image | undefined): Qcow2EngineBacking | null {
  if (backing instanceof Qcow2Image) return { engine: backing.engine, size: backing.size };
  if (backing instanceof RawImage) return { file: backing.file, size: backing.size };
  return null;
}
