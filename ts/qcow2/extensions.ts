/** qcow2 header extensions: the area between the header and the backing file name. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import type { FeatureName } from './features.js';
import { decodeName, encodeName } from './text.js';

/** Header extension type codes. */
export const ExtensionType = {
  END: 0x00000000,
  BACKING_FORMAT: 0xe2792aca,
  FEATURE_NAMES: 0x6803f857,
  BITMAPS: 0x23852875,
  FULL_DISK_ENCRYPTION: 0x0537be77,
  DATA_FILE: 0x44415441,
} as const;

/** One header extension as stored (data without padding), kept byte-exact for rewriting. */
export interface HeaderExtension {
  type: number;
  data: Buffer;
}

/** The bitmaps extension: where the bitmap directory lies. */
export interface BitmapsExtension {
  nbBitmaps: number;
  bitmapDirectorySize: number;
  bitmapDirectoryOffset: number;
}

/** Where a LUKS header lies (full disk encryption extension). */
export interface FullDiskEncryption {
  offset: number;
  length: number;
}

/** What the known extensions say, decoded. */
export interface DecodedExtensions {
  extensions: HeaderExtension[];
  /** Offset just past the end-of-extensions marker. */
  end: number;
  backingFormat?: string;
  dataFile?: string;
  featureNames: FeatureName[];
  bitmaps?: BitmapsExtension;
  fullDiskEncryption?: FullDiskEncryption;
}

/** qemu's limit on the bitmaps of one image. */
export const MAX_BITMAPS = 65535;
/** Bound on the bitmap directory: each of the 65535 entries at most 1 KiB in qemu's accounting. */
export const MAX_BITMAP_DIRECTORY_SIZE = 64 * 1024 * 1024;
/** Longest backing format name accepted (the same bound as backing file names). */
const MAX_FORMAT_NAME = 1023;
const FEATURE_ENTRY_SIZE = 48;
const FEATURE_TYPES = ['incompatible', 'compatible', 'autoclear'] as const;

function invalid(message: string): Qcow2Error {
  return new Qcow2Error(ErrorCodes.INVALID_HEADER, message);
}

/** Round up to the 8-byte padding extensions and snapshot entries use. */
export function align8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

/** Read a u64 that must be a safe integer. */
export function readSafeU64(buf: Buffer, at: number, what: string): number {
  const value = buf.readBigUInt64BE(at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid(`${what} ${value} exceeds 2^53`);
  return Number(value);
}

/**
 * Walk the extensions from `start` up to the end marker; everything must lie before `limit`
 * (the first cluster's end, or the backing file name).
 */
export function parseExtensions(buf: Buffer, start: number, limit: number, clusterSize: number, fileSize: number): DecodedExtensions {
  const out: DecodedExtensions = { extensions: [], end: 0, featureNames: [] };
  let at = start;
  for (;;) {
    if (at + 8 > limit) {
      throw invalid(`header extension at offset ${at} runs past ${limit} (end of the extension area) without an end marker`);
    }
    const type = buf.readUInt32BE(at);
    const length = buf.readUInt32BE(at + 4);
    if (type === ExtensionType.END) {
      out.end = at + 8;
      return out;
    }
    const dataEnd = at + 8 + length;
    if (at + 8 + align8(length) > limit) {
      throw invalid(`header extension 0x${hex(type)} at offset ${at} with length ${length} ends past ${limit} (end of the extension area)`);
    }
    const data = Buffer.from(buf.subarray(at + 8, dataEnd));
    addExtension(out, { type, data }, clusterSize, fileSize);
    at += 8 + align8(length);
  }
}

function hex(type: number): string {
  return type.toString(16).padStart(8, '0');
}

/** Record one extension, decoding the known types; a known type twice with different data is refused. */
function addExtension(out: DecodedExtensions, ext: HeaderExtension, clusterSize: number, fileSize: number): void {
  const known = Object.values(ExtensionType).includes(ext.type as never);
  const earlier = out.extensions.find((e) => e.type === ext.type);
  out.extensions.push(ext);
  if (!known) return;
  if (earlier) {
    if (earlier.data.equals(ext.data)) return;
    throw invalid(`header extension 0x${hex(ext.type)} appears twice with different contents`);
  }
  switch (ext.type) {
    case ExtensionType.BACKING_FORMAT:
      if (ext.data.length > MAX_FORMAT_NAME) {
        throw invalid(`backing format name length ${ext.data.length} exceeds ${MAX_FORMAT_NAME} bytes`);
      }
      out.backingFormat = decodeName(ext.data);
      return;
    case ExtensionType.DATA_FILE:
      out.dataFile = decodeName(ext.data);
      return;
    case ExtensionType.FEATURE_NAMES:
      out.featureNames = parseFeatureNames(ext.data);
      return;
    case ExtensionType.BITMAPS:
      out.bitmaps = parseBitmapsExtension(ext.data, clusterSize, fileSize);
      return;
    case ExtensionType.FULL_DISK_ENCRYPTION:
      out.fullDiskEncryption = parseFullDiskEncryption(ext.data, clusterSize, fileSize);
      return;
  }
}

/** Feature name table: 48-byte entries (type, bit, 46-byte zero-padded name); entries of unknown type are skipped. */
function parseFeatureNames(data: Buffer): FeatureName[] {
  if (data.length % FEATURE_ENTRY_SIZE !== 0) {
    throw invalid(`feature name table length ${data.length} is not a multiple of ${FEATURE_ENTRY_SIZE}`);
  }
  const names: FeatureName[] = [];
  for (let at = 0; at < data.length; at += FEATURE_ENTRY_SIZE) {
    const type = FEATURE_TYPES[data[at]];
    const bit = data[at + 1];
    if (bit > 63) throw invalid(`feature name table entry ${at / FEATURE_ENTRY_SIZE} names bit ${bit}, outside 0..63`);
    if (type === undefined) continue;
    const raw = data.subarray(at + 2, at + FEATURE_ENTRY_SIZE);
    const nul = raw.indexOf(0);
    names.push({ type, bit, name: decodeName(raw.subarray(0, nul < 0 ? raw.length : nul)) });
  }
  return names;
}

function parseBitmapsExtension(data: Buffer, clusterSize: number, fileSize: number): BitmapsExtension {
  if (data.length !== 24) throw invalid(`bitmaps extension length ${data.length} is not 24`);
  const nbBitmaps = data.readUInt32BE(0);
  const reserved = data.readUInt32BE(4);
  const bitmapDirectorySize = readSafeU64(data, 8, 'bitmap directory size');
  const bitmapDirectoryOffset = readSafeU64(data, 16, 'bitmap directory offset');
  if (nbBitmaps < 1 || nbBitmaps > MAX_BITMAPS) throw invalid(`bitmaps extension: nb_bitmaps ${nbBitmaps} is outside 1..${MAX_BITMAPS}`);
  if (reserved !== 0) throw invalid(`bitmaps extension: reserved field is ${reserved}, must be 0`);
  if (bitmapDirectorySize > MAX_BITMAP_DIRECTORY_SIZE) {
    throw invalid(`bitmap directory size ${bitmapDirectorySize} exceeds ${MAX_BITMAP_DIRECTORY_SIZE}`);
  }
  if (bitmapDirectorySize < nbBitmaps * 24) {
    throw invalid(`bitmap directory size ${bitmapDirectorySize} is below the ${nbBitmaps * 24} bytes ${nbBitmaps} entries need`);
  }
  if (bitmapDirectoryOffset % clusterSize !== 0) {
    throw invalid(`bitmap directory offset ${bitmapDirectoryOffset} is not aligned to the cluster size ${clusterSize}`);
  }
  if (bitmapDirectoryOffset + bitmapDirectorySize > fileSize) {
    throw invalid(`bitmap directory at ${bitmapDirectoryOffset} (+${bitmapDirectorySize} bytes) ends past the end of the file (${fileSize} bytes)`);
  }
  return { nbBitmaps, bitmapDirectorySize, bitmapDirectoryOffset };
}

function parseFullDiskEncryption(data: Buffer, clusterSize: number, fileSize: number): FullDiskEncryption {
  if (data.length !== 16) throw invalid(`full disk encryption extension length ${data.length} is not 16`);
  const offset = readSafeU64(data, 0, 'encryption header offset');
  const length = readSafeU64(data, 8, 'encryption header length');
  if (offset % clusterSize !== 0) throw invalid(`encryption header offset ${offset} is not aligned to the cluster size ${clusterSize}`);
  if (offset + length > fileSize) {
    throw invalid(`encryption header at ${offset} (+${length} bytes) ends past the end of the file (${fileSize} bytes)`);
  }
  return { offset, length };
}

/** Encode a feature name table. */
export function encodeFeatureNames(names: readonly FeatureName[]): Buffer {
  const out = Buffer.alloc(names.length * FEATURE_ENTRY_SIZE);
  names.forEach((f, i) => {
    const at = i * FEATURE_ENTRY_SIZE;
    out[at] = FEATURE_TYPES.indexOf(f.type);
    out[at + 1] = f.bit;
    const name = encodeName(f.name);
    if (name.length > FEATURE_ENTRY_SIZE - 2) {
      throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `feature name '${f.name}' is ${name.length} bytes, more than ${FEATURE_ENTRY_SIZE - 2}`);
    }
    name.copy(out, at + 2);
  });
  return out;
}

/** Encode the bitmaps extension. */
export function encodeBitmapsExtension(b: BitmapsExtension): Buffer {
  const out = Buffer.alloc(24);
  out.writeUInt32BE(b.nbBitmaps, 0);
  out.writeBigUInt64BE(BigInt(b.bitmapDirectorySize), 8);
  out.writeBigUInt64BE(BigInt(b.bitmapDirectoryOffset), 16);
  return out;
}

/** Encode the full disk encryption extension. */
export function encodeFullDiskEncryption(f: FullDiskEncryption): Buffer {
  const out = Buffer.alloc(16);
  out.writeBigUInt64BE(BigInt(f.offset), 0);
  out.writeBigUInt64BE(BigInt(f.length), 8);
  return out;
}

/** Lay out extensions (each padded to 8 bytes with zeros) followed by the end marker. */
export function encodeExtensionArea(extensions: readonly HeaderExtension[]): Buffer {
  const parts: Buffer[] = [];
  for (const ext of extensions) {
    const head = Buffer.alloc(8);
    head.writeUInt32BE(ext.type >>> 0, 0);
    head.writeUInt32BE(ext.data.length, 4);
    parts.push(head, ext.data, Buffer.alloc(align8(ext.data.length) - ext.data.length));
  }
  parts.push(Buffer.alloc(8));
  return Buffer.concat(parts);
}
