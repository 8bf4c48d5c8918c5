/** The qcow2 header: parse and validate (versions 2 and 3), and serialise it back byte-exact. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import {
  BitmapsExtension,
  ExtensionType,
  FullDiskEncryption,
  HeaderExtension,
  encodeBitmapsExtension,
  encodeExtensionArea,
  encodeFeatureNames,
  encodeFullDiskEncryption,
  parseExtensions,
  readSafeU64,
} from './extensions.js';
import {
  AutoclearBit,
  CompatibleBit,
  FeatureName,
  IncompatibleBit,
  KNOWN_AUTOCLEAR,
  KNOWN_INCOMPATIBLE,
  checkIncompatibleFeatures,
  hasBit,
  withBit,
} from './features.js';
import { MetadataFile, openMetadataFile, readRange } from './metadata-file.js';
import { decodeName, encodeName } from './text.js';

export type { FeatureName } from './features.js';
export type { HeaderExtension } from './extensions.js';

/** The qcow2 magic, "QFI\xfb". */
export const QCOW2_MAGIC = 0x514649fb;
/** Smallest cluster_bits (512-byte clusters, spec). */
export const MIN_CLUSTER_BITS = 9;
/** Largest cluster_bits (qemu's 2 MiB limit). */
export const MAX_CLUSTER_BITS = 21;
/** Extended L2 entries need clusters of at least 16 KiB (spec). */
export const MIN_CLUSTER_BITS_EXTENDED_L2 = 14;
/**
 * Byte offsets of the header fields (spec: docs/interop/qcow2.txt), written down here only: the
 * native engine is handed the ones it updates itself (Qcow2EngineParams.headerFields).
 */
export const HEADER_FIELD_OFFSETS = {
  magic: 0,
  version: 4,
  backingFileOffset: 8,
  backingFileSize: 16,
  clusterBits: 20,
  size: 24,
  cryptMethod: 32,
  l1Size: 36,
  l1TableOffset: 40,
  refcountTableOffset: 48,
  refcountTableClusters: 56,
  nbSnapshots: 60,
  snapshotsOffset: 64,
  incompatibleFeatures: 72,
  compatibleFeatures: 80,
  autoclearFeatures: 88,
  refcountOrder: 96,
  headerLength: 100,
  compressionType: 104,
} as const;
const F = HEADER_FIELD_OFFSETS;
/** Length of a version 2 header. */
export const V2_HEADER_LENGTH = 72;
/** The least header_length a version 3 header may have. */
export const V3_MIN_HEADER_LENGTH = 104;
/** qemu's limit on the L1 table: 32 MiB. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
/** qemu's limit on the refcount table: 8 MiB. */
export const MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024;
/** qemu's limit on internal snapshots. */
export const MAX_SNAPSHOTS = 65536;
/** Longest backing file name (spec). */
export const MAX_BACKING_FILE_NAME = 1023;
/** Largest refcount_order (64-bit refcounts). */
export const MAX_REFCOUNT_ORDER = 6;

/** A parsed qcow2 header with its extensions. Known feature bits are mirrored in booleans. */
export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  clusterSize: number;
  /** Virtual size in bytes. */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  /** Refcount bits = 1 << refcountOrder. */
  refcountOrder: number;
  headerLength: number;
  compressionType: 'zlib' | 'zstd';
  dirty: boolean;
  corrupt: boolean;
  externalDataFile: boolean;
  extendedL2: boolean;
  /** Compatible bit 0. */
  lazyRefcounts: boolean;
  /** Autoclear bit 1. */
  dataFileRaw: boolean;
  /** Autoclear bit 0: the bitmaps extension is consistent. */
  bitmapsAutoclear: boolean;
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  featureNames: FeatureName[];
  bitmaps?: BitmapsExtension;
  /** The LUKS header pointer; parseHeader refuses encrypted images, so only written headers carry it. */
  fullDiskEncryption?: FullDiskEncryption;
  /** Every extension incl. unknown ones, in file order, byte-exact, for rewriting. */
  extensions: HeaderExtension[];
  /** Header bytes past the fields this package knows (105..headerLength), kept for rewriting (spec: preserve unknown additional fields). */
  unknownHeaderFields: Buffer;
}

function invalid(message: string): Qcow2Error {
  return new Qcow2Error(ErrorCodes.INVALID_HEADER, message);
}

/** Entries the L1 table needs to map `size` guest bytes. */
export function requiredL1Entries(size: number, clusterBits: number, extendedL2: boolean): number {
  const clusterSize = 2 ** clusterBits;
  const l2Entries = clusterSize / (extendedL2 ? 16 : 8);
  return Math.ceil(size / (clusterSize * l2Entries));
}

/**
 * Check magic, version and cluster_bits, and return the cluster size: the part of the header a
 * reader needs to know how much to read.
 */
export function probeClusterSize(buf: Buffer): number {
  if (buf.length < 4 || buf.readUInt32BE(F.magic) !== QCOW2_MAGIC) {
    throw new Qcow2Error(ErrorCodes.WRONG_FORMAT, 'Image is not in qcow2 format');
  }
  if (buf.length < V2_HEADER_LENGTH) throw invalid(`qcow2 header too short: ${buf.length} bytes, at least ${V2_HEADER_LENGTH} needed`);
  const version = buf.readUInt32BE(F.version);
  if (version !== 2 && version !== 3) {
    throw new Qcow2Error(ErrorCodes.UNSUPPORTED_VERSION, `Unsupported qcow2 version ${version} (only 2 and 3 are supported)`);
  }
  const clusterBits = buf.readUInt32BE(F.clusterBits);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw invalid(`cluster_bits ${clusterBits} is outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`);
  }
  return 2 ** clusterBits;
}

/** Parse and validate a header; `buf` holds at least the first cluster, or the whole file when it is shorter. */
export function parseHeader(buf: Buffer, fileSize: number): Qcow2Header {
  const clusterSize = probeClusterSize(buf);
  const firstCluster = Math.min(clusterSize, buf.length);
  if (buf.length < Math.min(clusterSize, fileSize)) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `parseHeader needs the first cluster (${clusterSize} bytes), got ${buf.length}`);
  }
  const version = buf.readUInt32BE(F.version) as 2 | 3;
  const headerLength = readHeaderLength(buf, version, firstCluster);
  const h = decodeFixedFields(buf, version, clusterSize, headerLength);
  checkFeatureFields(h, buf);
  checkTables(h, fileSize);
  const extStart = version === 2 ? V2_HEADER_LENGTH : headerLength;
  const extLimit = checkBackingFileName(h, firstCluster, extStart);
  const ext = parseExtensions(buf, extStart, extLimit, clusterSize, fileSize);
  if (h.backingFileOffset !== 0 && h.backingFileSize > 0) {
    h.backingFile = decodeName(buf.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize));
  }
  checkIncompatibleFeatures(h.incompatibleFeatures, ext.featureNames);
  if (ext.fullDiskEncryption) throw invalid('full disk encryption header extension present, but crypt_method is 0 (spec: only with LUKS)');
  return {
    ...h,
    backingFormat: ext.backingFormat,
    dataFile: ext.dataFile,
    featureNames: ext.featureNames,
    bitmaps: ext.bitmaps,
    extensions: ext.extensions,
  };
}

function readHeaderLength(buf: Buffer, version: 2 | 3, firstCluster: number): number {
  if (version === 2) return V2_HEADER_LENGTH;
  if (buf.length < V3_MIN_HEADER_LENGTH) {
    throw invalid(`qcow2 header too short: ${buf.length} bytes, a version 3 header needs ${V3_MIN_HEADER_LENGTH}`);
  }
  const length = buf.readUInt32BE(F.headerLength);
  if (length < V3_MIN_HEADER_LENGTH) throw invalid(`header_length ${length} is below the minimum ${V3_MIN_HEADER_LENGTH}`);
  if (length % 8 !== 0) throw invalid(`header_length ${length} is not a multiple of 8`);
  if (length > firstCluster) throw invalid(`header_length ${length} exceeds the first cluster (${firstCluster} bytes)`);
  return length;
}

type FixedFields = Omit<Qcow2Header, 'featureNames' | 'extensions'>;

function decodeFixedFields(buf: Buffer, version: 2 | 3, clusterSize: number, headerLength: number): FixedFields {
  const v3 = version === 3;
  const size = buf.readBigUInt64BE(F.size);
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid(`virtual size ${size} exceeds 2^53`);
  const cryptMethod = buf.readUInt32BE(F.cryptMethod);
  if (cryptMethod !== 0) {
    const kind = cryptMethod === 1 ? 'AES' : cryptMethod === 2 ? 'LUKS' : 'unknown';
    throw new Qcow2Error(ErrorCodes.ENCRYPTED, `encrypted images are not supported (crypt_method ${cryptMethod}: ${kind})`);
  }
  const incompatibleFeatures = v3 ? buf.readBigUInt64BE(F.incompatibleFeatures) : 0n;
  const compatibleFeatures = v3 ? buf.readBigUInt64BE(F.compatibleFeatures) : 0n;
  const autoclearFeatures = v3 ? buf.readBigUInt64BE(F.autoclearFeatures) : 0n;
  const compressionByte = v3 && headerLength > F.compressionType ? buf[F.compressionType] : 0;
  return {
    version,
    backingFileOffset: readSafeU64(buf, F.backingFileOffset, 'backing_file_offset'),
    backingFileSize: buf.readUInt32BE(F.backingFileSize),
    clusterBits: buf.readUInt32BE(F.clusterBits),
    clusterSize,
    size: Number(size),
    cryptMethod,
    l1Size: buf.readUInt32BE(F.l1Size),
    l1TableOffset: readSafeU64(buf, F.l1TableOffset, 'l1_table_offset'),
    refcountTableOffset: readSafeU64(buf, F.refcountTableOffset, 'refcount_table_offset'),
    refcountTableClusters: buf.readUInt32BE(F.refcountTableClusters),
    nbSnapshots: buf.readUInt32BE(F.nbSnapshots),
    snapshotsOffset: readSafeU64(buf, F.snapshotsOffset, 'snapshots_offset'),
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder: v3 ? buf.readUInt32BE(F.refcountOrder) : 4,
    headerLength,
    compressionType: compressionTypeName(compressionByte),
    dirty: hasBit(incompatibleFeatures, IncompatibleBit.DIRTY),
    corrupt: hasBit(incompatibleFeatures, IncompatibleBit.CORRUPT),
    externalDataFile: hasBit(incompatibleFeatures, IncompatibleBit.EXTERNAL_DATA_FILE),
    extendedL2: hasBit(incompatibleFeatures, IncompatibleBit.EXTENDED_L2),
    lazyRefcounts: hasBit(compatibleFeatures, CompatibleBit.LAZY_REFCOUNTS),
    dataFileRaw: hasBit(autoclearFeatures, AutoclearBit.DATA_FILE_RAW),
    bitmapsAutoclear: hasBit(autoclearFeatures, AutoclearBit.BITMAPS),
    unknownHeaderFields: Buffer.from(buf.subarray(Math.min(105, headerLength), headerLength)),
  };
}

function compressionTypeName(byte: number): 'zlib' | 'zstd' {
  if (byte === 0) return 'zlib';
  if (byte === 1) return 'zstd';
  throw invalid(`compression_type ${byte} is unknown (0 zlib, 1 zstd)`);
}

function checkFeatureFields(h: FixedFields, buf: Buffer): void {
  if (h.refcountOrder > MAX_REFCOUNT_ORDER) throw invalid(`refcount_order ${h.refcountOrder} exceeds ${MAX_REFCOUNT_ORDER} (64-bit refcounts)`);
  const compressionBit = hasBit(h.incompatibleFeatures, IncompatibleBit.COMPRESSION_TYPE);
  const compressionByte = h.headerLength > F.compressionType ? buf[F.compressionType] : 0;
  if (compressionBit && compressionByte === 0) {
    throw invalid('compression type bit (incompatible bit 3) is set, but compression_type is 0 (zlib) or absent');
  }
  if (!compressionBit && compressionByte !== 0) {
    throw invalid(`compression_type ${compressionByte} needs the compression type bit (incompatible bit 3), which is clear`);
  }
  if (h.extendedL2 && h.clusterBits < MIN_CLUSTER_BITS_EXTENDED_L2) {
    throw invalid(`extended L2 entries need cluster_bits >= ${MIN_CLUSTER_BITS_EXTENDED_L2}, got ${h.clusterBits}`);
  }
}

/** A metadata table must be cluster aligned, clear of the header, and inside the file. */
function checkTable(what: string, offset: number, bytes: number, clusterSize: number, fileSize: number): void {
  if (offset % clusterSize !== 0) throw invalid(`${what} offset ${offset} is not aligned to the cluster size ${clusterSize}`);
  if (bytes === 0) return;
  if (offset < clusterSize) throw invalid(`${what} offset ${offset} overlaps the header cluster`);
  if (offset + bytes > fileSize) {
    throw invalid(`${what} at ${offset} (+${bytes} bytes) ends past the end of the file (${fileSize} bytes)`);
  }
}

function checkTables(h: FixedFields, fileSize: number): void {
  const l1Bytes = h.l1Size * 8;
  if (l1Bytes > MAX_L1_BYTES) throw invalid(`L1 table size ${h.l1Size} entries (${l1Bytes} bytes) exceeds the ${MAX_L1_BYTES} byte limit`);
  const needed = requiredL1Entries(h.size, h.clusterBits, h.extendedL2);
  if (h.l1Size < needed) throw invalid(`L1 table size ${h.l1Size} entries is too small for virtual size ${h.size} (needs ${needed})`);
  checkTable('L1 table', h.l1TableOffset, l1Bytes, h.clusterSize, fileSize);

  const refcountBytes = h.refcountTableClusters * h.clusterSize;
  if (h.refcountTableClusters === 0) throw invalid('refcount_table_clusters is 0: the image has no refcount table');
  if (refcountBytes > MAX_REFCOUNT_TABLE_BYTES) {
    throw invalid(`refcount table of ${h.refcountTableClusters} clusters (${refcountBytes} bytes) exceeds the ${MAX_REFCOUNT_TABLE_BYTES} byte limit`);
  }
  checkTable('refcount table', h.refcountTableOffset, refcountBytes, h.clusterSize, fileSize);

  if (h.nbSnapshots > MAX_SNAPSHOTS) throw invalid(`nb_snapshots ${h.nbSnapshots} exceeds ${MAX_SNAPSHOTS}`);
  // Entries have variable length: only the start is checked here, the table itself in snapshots.ts.
  checkTable('snapshot table', h.snapshotsOffset, h.nbSnapshots > 0 ? 1 : 0, h.clusterSize, fileSize);
}

/** Check the backing file name's place; returns where the extension area must end. */
function checkBackingFileName(h: FixedFields, firstCluster: number, extStart: number): number {
  if (h.backingFileOffset === 0) return firstCluster;
  if (h.backingFileSize > MAX_BACKING_FILE_NAME) {
    throw invalid(`backing file name length ${h.backingFileSize} exceeds ${MAX_BACKING_FILE_NAME} bytes`);
  }
  if (h.backingFileOffset < extStart) {
    throw invalid(`backing file name offset ${h.backingFileOffset} lies inside the header (${extStart} bytes)`);
  }
  if (h.backingFileOffset + h.backingFileSize > firstCluster) {
    throw invalid(`backing file name at ${h.backingFileOffset} (+${h.backingFileSize} bytes) ends past the first cluster (${firstCluster} bytes)`);
  }
  return h.backingFileOffset;
}

/** The header with autoclear bits outside `keep` cleared, as a writable open must store it (spec: autoclear features). */
export function clearUnknownAutoclear(header: Qcow2Header, keep: bigint = KNOWN_AUTOCLEAR): Qcow2Header {
  const autoclearFeatures = header.autoclearFeatures & keep;
  return {
    ...header,
    autoclearFeatures,
    bitmapsAutoclear: hasBit(autoclearFeatures, AutoclearBit.BITMAPS),
    dataFileRaw: hasBit(autoclearFeatures, AutoclearBit.DATA_FILE_RAW),
  };
}

/** The feature masks to store: known bits from the booleans, unknown bits as the masks carry them. */
function featureMasks(h: Qcow2Header): { incompatible: bigint; compatible: bigint; autoclear: bigint } {
  let incompatible = h.incompatibleFeatures & ~KNOWN_INCOMPATIBLE;
  incompatible = withBit(incompatible, IncompatibleBit.DIRTY, h.dirty);
  incompatible = withBit(incompatible, IncompatibleBit.CORRUPT, h.corrupt);
  incompatible = withBit(incompatible, IncompatibleBit.EXTERNAL_DATA_FILE, h.externalDataFile);
  incompatible = withBit(incompatible, IncompatibleBit.COMPRESSION_TYPE, h.compressionType !== 'zlib');
  incompatible = withBit(incompatible, IncompatibleBit.EXTENDED_L2, h.extendedL2);
  const compatible = withBit(h.compatibleFeatures, CompatibleBit.LAZY_REFCOUNTS, h.lazyRefcounts);
  let autoclear = withBit(h.autoclearFeatures, AutoclearBit.BITMAPS, h.bitmapsAutoclear);
  autoclear = withBit(autoclear, AutoclearBit.DATA_FILE_RAW, h.dataFileRaw);
  return { incompatible, compatible, autoclear };
}

/**
 * The data to store for a known extension type: the original bytes when they still say what the
 * header fields say (so rewriting is byte-exact), freshly encoded otherwise, undefined to drop it.
 */
function knownExtensionData(h: Qcow2Header, type: number, original: Buffer | undefined): Buffer | undefined {
  const text = (value: string | undefined) =>
    value === undefined ? undefined : original && decodeName(original) === value ? original : encodeName(value);
  switch (type) {
    case ExtensionType.BACKING_FORMAT:
      return text(h.backingFormat);
    case ExtensionType.DATA_FILE:
      return text(h.dataFile);
    case ExtensionType.FEATURE_NAMES: {
      if (h.featureNames.length === 0) return undefined;
      const encoded = encodeFeatureNames(h.featureNames);
      return original && sameFeatureNames(original, encoded) ? original : encoded;
    }
    case ExtensionType.BITMAPS:
      return h.bitmaps && encodeBitmapsExtension(h.bitmaps);
    case ExtensionType.FULL_DISK_ENCRYPTION:
      return h.fullDiskEncryption && encodeFullDiskEncryption(h.fullDiskEncryption);
  }
  return undefined;
}

/** Two feature tables that differ only in bytes after a name's terminating zero say the same. */
function sameFeatureNames(a: Buffer, b: Buffer): boolean {
  if (a.length !== b.length) return false;
  for (let at = 0; at < a.length; at += 48) {
    const name = (x: Buffer) => {
      const raw = x.subarray(at + 2, at + 48);
      const nul = raw.indexOf(0);
      return raw.subarray(0, nul < 0 ? raw.length : nul);
    };
    if (a[at] !== b[at] || a[at + 1] !== b[at + 1] || !name(a).equals(name(b))) return false;
  }
  return true;
}

/** qemu's order for extensions a header gains (spec order otherwise free). */
const NEW_EXTENSION_ORDER = [
  ExtensionType.FULL_DISK_ENCRYPTION,
  ExtensionType.BACKING_FORMAT,
  ExtensionType.DATA_FILE,
  ExtensionType.FEATURE_NAMES,
  ExtensionType.BITMAPS,
];

/** The extensions to write: unknown ones verbatim in place, known ones from the header fields. */
export function extensionsToWrite(h: Qcow2Header): HeaderExtension[] {
  const pending = new Set<number>(NEW_EXTENSION_ORDER);
  const out: HeaderExtension[] = [];
  for (const ext of h.extensions) {
    if (!(NEW_EXTENSION_ORDER as number[]).includes(ext.type)) {
      out.push(ext);
      continue;
    }
    if (!pending.delete(ext.type)) continue;
    const data = knownExtensionData(h, ext.type, ext.data);
    if (data) out.push({ type: ext.type, data });
  }
  for (const type of NEW_EXTENSION_ORDER) {
    if (!pending.has(type)) continue;
    const data = knownExtensionData(h, type, undefined);
    if (data) out.push({ type, data });
  }
  return out;
}

/**
 * Serialise the header area: header fields, extensions, end marker and backing file name (placed
 * right after the extensions, as qemu does). It must fit in `clusterSize` (default: the image's).
 */
export function serializeHeader(header: Qcow2Header, clusterSize: number = header.clusterSize): Buffer {
  const h = header;
  const v3 = h.version === 3;
  const length = v3 ? h.headerLength : V2_HEADER_LENGTH;
  const { incompatible, compatible, autoclear } = featureMasks(h);
  if (!v3 && (incompatible | compatible | autoclear) !== 0n) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, 'a version 2 header cannot store feature bits');
  }
  if (!v3 && h.refcountOrder !== 4) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `a version 2 header needs refcount_order 4, got ${h.refcountOrder}`);
  }
  if (v3 && h.compressionType !== 'zlib' && length <= 104) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `compression type ${h.compressionType} needs header_length > 104, got ${length}`);
  }
  const fixed = Buffer.alloc(length);
  fixed.writeUInt32BE(QCOW2_MAGIC, F.magic);
  fixed.writeUInt32BE(h.version, F.version);
  fixed.writeUInt32BE(h.clusterBits, F.clusterBits);
  fixed.writeBigUInt64BE(BigInt(h.size), F.size);
  fixed.writeUInt32BE(h.cryptMethod, F.cryptMethod);
  fixed.writeUInt32BE(h.l1Size, F.l1Size);
  fixed.writeBigUInt64BE(BigInt(h.l1TableOffset), F.l1TableOffset);
  fixed.writeBigUInt64BE(BigInt(h.refcountTableOffset), F.refcountTableOffset);
  fixed.writeUInt32BE(h.refcountTableClusters, F.refcountTableClusters);
  fixed.writeUInt32BE(h.nbSnapshots, F.nbSnapshots);
  fixed.writeBigUInt64BE(BigInt(h.snapshotsOffset), F.snapshotsOffset);
  if (v3) {
    fixed.writeBigUInt64BE(incompatible, F.incompatibleFeatures);
    fixed.writeBigUInt64BE(compatible, F.compatibleFeatures);
    fixed.writeBigUInt64BE(autoclear, F.autoclearFeatures);
    fixed.writeUInt32BE(h.refcountOrder, F.refcountOrder);
    fixed.writeUInt32BE(length, F.headerLength);
    if (length > F.compressionType) fixed[F.compressionType] = h.compressionType === 'zstd' ? 1 : 0;
    h.unknownHeaderFields.copy(fixed, 105, 0, Math.max(0, length - 105));
  }
  const extensions = encodeExtensionArea(extensionsToWrite(h));
  const backing = h.backingFile === undefined ? Buffer.alloc(0) : encodeName(h.backingFile);
  if (backing.length > MAX_BACKING_FILE_NAME) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `backing file name is ${backing.length} bytes, more than ${MAX_BACKING_FILE_NAME}`);
  }
  const backingOffset = backing.length > 0 ? length + extensions.length : 0;
  fixed.writeBigUInt64BE(BigInt(backingOffset), F.backingFileOffset);
  fixed.writeUInt32BE(backing.length, F.backingFileSize);
  const out = Buffer.concat([fixed, extensions, backing]);
  if (out.length > clusterSize) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `header area of ${out.length} bytes does not fit in the first cluster (${clusterSize} bytes)`);
  }
  return out;
}

/** Read and parse the header of an open image file. */
export async function readHeaderFrom(file: MetadataFile): Promise<Qcow2Header> {
  const first = await readRange(file, 0, Math.min(file.size, 4096), 'qcow2 header');
  const clusterSize = probeClusterSize(first);
  const buf = clusterSize <= first.length || file.size <= first.length ? first : await readRange(file, 0, Math.min(clusterSize, file.size), 'qcow2 header');
  return parseHeader(buf, file.size);
}

/** Read and parse the header of the qcow2 image at `path`. */
export async function readHeader(path: string): Promise<{ header: Qcow2Header; fileSize: number }> {
  const file = await openMetadataFile(path);
  try {
    return { header: await readHeaderFrom(file), fileSize: file.size };
  } finally {
    await file.handle.close();
  }
}
