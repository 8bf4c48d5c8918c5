/** Creating qcow2 images: options checked as qemu-img checks them, tables laid out by the engine, header written last. */
import nodePath from 'node:path';

import { ErrorCodes, Qcow2Error, asQcow2Error, settle } from '../errors.js';
import { NativeFile, native } from '../native.js';
import type { FeatureName } from './features.js';
import { MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, MIN_CLUSTER_BITS_EXTENDED_L2, Qcow2Header, serializeHeader } from './header.js';

/** Options of createQcow2, named and defaulted as qemu-img create -f qcow2 -o takes them. */
export interface Qcow2CreateOptions {
  /** Virtual size in bytes. */
  size: number;
  /** '1.1' (version 3, the default) or '0.10' (version 2). */
  compat?: '0.10' | '1.1';
  /** Power of two from 512 to 2 MiB; default 65536. */
  clusterSize?: number;
  /** 1, 2, 4, 8, 16, 32 or 64; default 16 (the only width version 2 has). */
  refcountBits?: number;
  /** Recorded as given: relative names stay relative to the image. */
  backingFile?: string;
  backingFormat?: 'raw' | 'qcow2';
  /** External data file name (created when missing, sized to the disk). */
  dataFile?: string;
  dataFileRaw?: boolean;
  extendedL2?: boolean;
  lazyRefcounts?: boolean;
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
  compressionType?: 'zlib' | 'zstd';
}

/** The feature name table qemu-img writes into every version 3 image. */
export const FEATURE_NAMES: readonly FeatureName[] = [
  { type: 'incompatible', bit: 0, name: 'dirty bit' },
  { type: 'incompatible', bit: 1, name: 'corrupt bit' },
  { type: 'incompatible', bit: 2, name: 'external data file' },
  { type: 'incompatible', bit: 3, name: 'compression type' },
  { type: 'incompatible', bit: 4, name: 'extended L2 entries' },
  { type: 'compatible', bit: 0, name: 'lazy refcounts' },
  { type: 'autoclear', bit: 0, name: 'bitmaps' },
  { type: 'autoclear', bit: 1, name: 'raw external data' },
];

/** qemu's version 3 header length: the fields up to the compression type, padded to 8 bytes. */
export const V3_HEADER_LENGTH = 112;
const V2_HEADER_LENGTH = 72;

function invalid(message: string): Qcow2Error {
  return new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, message);
}

/** The options with defaults filled in, refused with qemu-img's wording where qemu-img refuses them. */
function resolveOptions(o: Qcow2CreateOptions): Required<Omit<Qcow2CreateOptions, 'backingFile' | 'backingFormat' | 'dataFile'>> &
  Pick<Qcow2CreateOptions, 'backingFile' | 'backingFormat' | 'dataFile'> {
  if (!Number.isSafeInteger(o.size) || o.size < 0) throw invalid(`size must be a non-negative integer, got ${o.size}`);
  const r = {
    size: o.size,
    compat: o.compat ?? '1.1',
    clusterSize: o.clusterSize ?? 65536,
    refcountBits: o.refcountBits ?? 16,
    backingFile: o.backingFile,
    backingFormat: o.backingFormat,
    dataFile: o.dataFile,
    dataFileRaw: o.dataFileRaw ?? false,
    extendedL2: o.extendedL2 ?? false,
    lazyRefcounts: o.lazyRefcounts ?? false,
    preallocation: o.preallocation ?? 'off',
    compressionType: o.compressionType ?? 'zlib',
  };
  if (r.compat !== '0.10' && r.compat !== '1.1') throw invalid(`Invalid compatibility level: '${r.compat as string}'`);
  const cs = r.clusterSize;
  if (!Number.isSafeInteger(cs) || cs < 2 ** MIN_CLUSTER_BITS || cs > 2 ** MAX_CLUSTER_BITS || (cs & (cs - 1)) !== 0) {
    throw invalid(`Cluster size must be a power of two between 512 and 2048k, got ${cs}`);
  }
  const rb = r.refcountBits;
  if (!Number.isSafeInteger(rb) || rb < 1 || rb > 64 || (rb & (rb - 1)) !== 0) {
    throw invalid(`Refcount width must be a power of two and may not exceed 64 bits, got ${rb}`);
  }
  if (!['off', 'metadata', 'falloc', 'full'].includes(r.preallocation)) {
    throw invalid(`Invalid preallocation mode: '${r.preallocation}'`);
  }
  if (r.compressionType !== 'zlib' && r.compressionType !== 'zstd') {
    throw invalid(`Invalid compression type: '${r.compressionType as string}'`);
  }
  if (r.backingFormat !== undefined && r.backingFile === undefined) throw invalid('Backing format cannot be used without backing file');
  if (r.compat === '0.10') {
    const v3 = '(use version=v3 or greater)';
    if (r.lazyRefcounts) throw invalid(`Lazy refcounts only supported with compatibility level 1.1 and above ${v3}`);
    if (rb !== 16) throw invalid(`Different refcount widths than 16 bits require compatibility level 1.1 or above ${v3}`);
    if (r.extendedL2) throw invalid(`Extended L2 entries are only supported with compatibility level 1.1 and above ${v3}`);
    if (r.compressionType !== 'zlib') throw invalid(`Non-zlib compression type is only supported with compatibility level 1.1 and above ${v3}`);
    if (r.dataFile !== undefined) throw invalid(`External data files are only supported with compatibility level 1.1 and above ${v3}`);
  }
  if (r.extendedL2 && cs < 2 ** MIN_CLUSTER_BITS_EXTENDED_L2) {
    throw invalid('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  }
  if (r.dataFileRaw && r.dataFile === undefined) throw invalid('data-file-raw requires data-file');
  if (r.dataFileRaw && r.backingFile !== undefined) throw invalid('Backing file and data-file-raw cannot be used at the same time');
  if (r.backingFile !== undefined && r.preallocation !== 'off' && !r.extendedL2) {
    throw invalid('Backing file and preallocation can only be used at the same time if extended_l2 is on');
  }
  return r;
}

/** Create the qcow2 image `path` (replacing any file there), as qemu-img create -f qcow2 does. */
export async function createQcow2(path: string, options: Qcow2CreateOptions): Promise<void> {
  const o = resolveOptions(options);
  const clusterBits = Math.log2(o.clusterSize);
  const refcountOrder = Math.log2(o.refcountBits);
  const opened: NativeFile[] = [];
  try {
    const file = await settle(native.NativeFile.open(path, { writable: true, create: true, cache: 'writeback' }));
    opened.push(file);
    await settle(file.truncate(0));
    let dataFile: NativeFile | undefined;
    if (o.dataFile !== undefined) {
      // Opening the image resolves the name against the image's directory: create it there.
      const dataPath = nodePath.resolve(nodePath.dirname(path), o.dataFile);
      dataFile = await settle(native.NativeFile.open(dataPath, { writable: true, create: true, cache: 'writeback' }));
      opened.push(dataFile);
      await settle(dataFile.truncate(0));
      await settle(dataFile.truncate(o.size));
    }
    const layout = await settle(
      native.Qcow2Engine.format(
        file,
        { clusterBits, refcountOrder, size: o.size, extendedL2: o.extendedL2, preallocation: o.preallocation },
        dataFile,
      ),
    );
    const v3 = o.compat === '1.1';
    const header: Qcow2Header = {
      version: v3 ? 3 : 2,
      backingFileOffset: 0,
      backingFileSize: 0,
      clusterBits,
      clusterSize: o.clusterSize,
      size: o.size,
      cryptMethod: 0,
      l1Size: layout.l1Size,
      l1TableOffset: layout.l1TableOffset,
      refcountTableOffset: layout.refcountTableOffset,
      refcountTableClusters: layout.refcountTableClusters,
      nbSnapshots: 0,
      snapshotsOffset: 0,
      incompatibleFeatures: 0n,
      compatibleFeatures: 0n,
      autoclearFeatures: 0n,
      refcountOrder,
      headerLength: v3 ? V3_HEADER_LENGTH : V2_HEADER_LENGTH,
      compressionType: o.compressionType,
      dirty: false,
      corrupt: false,
      externalDataFile: o.dataFile !== undefined,
      extendedL2: o.extendedL2,
      lazyRefcounts: o.lazyRefcounts,
      dataFileRaw: o.dataFileRaw,
      bitmapsAutoclear: false,
      backingFile: o.backingFile,
      backingFormat: o.backingFormat,
      dataFile: o.dataFile,
      featureNames: v3 ? [...FEATURE_NAMES] : [],
      extensions: [],
      unknownHeaderFields: Buffer.alloc(v3 ? V3_HEADER_LENGTH - 105 : 0),
    };
    // Written last: until the header is there, the file is no image at all.
    await settle(file.write(serializeHeader(header), 0));
    await settle(file.flush());
    if (dataFile) await settle(dataFile.flush());
  } catch (error) {
    throw asQcow2Error(error);
  } finally {
    await Promise.allSettled(opened.map((f) => f.close()));
  }
}
