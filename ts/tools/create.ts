/** Creating images (library side of `qcow2 create`): option checks in qemu-img's order and wording, raw and qcow2. */
import { stat } from 'node:fs/promises';

import { ErrorCodes, Qcow2Error, asQcow2Error, check, settle } from '../errors.js';
import type { ImageFormat } from '../image.js';
import { NativeFile, allocAligned, native } from '../native.js';
import { open, probeFormat } from '../open.js';
import { Qcow2CreateOptions, createQcow2 } from '../qcow2/create.js';
import { errnoText } from '../qcow2/metadata-file.js';
import { combineFileName } from '../qcow2/text.js';

/** How space is reserved when an image is made or grown: qemu's preallocation modes. */
export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

const PREALLOCATIONS: readonly string[] = ['off', 'metadata', 'falloc', 'full'];

/** qemu accepts the compatibility level under two names each. */
const COMPAT_LEVELS: Record<string, '0.10' | '1.1'> = { '0.10': '0.10', v2: '0.10', '1.1': '1.1', v3: '1.1' };

/** Bounds of the qcow2 cluster size. */
const MIN_CLUSTER_SIZE = 512;
const MAX_CLUSTER_SIZE = 2 << 20;

/** Extended L2 entries split a cluster into 32 subclusters of at least 512 bytes. */
const MIN_EXTENDED_L2_CLUSTER = 16384;

/** What `create` makes: the format, the size, and qemu-img's `-o` options as typed values. */
export interface CreateOptions {
  /** 'qcow2' (default) or 'raw'. */
  format?: ImageFormat;
  /** Virtual size in bytes, rounded up to a multiple of 512. Taken from the backing image when left out. */
  size?: number;
  preallocation?: Preallocation;
  /** qcow2 compatibility level: '1.1' (or 'v3', default) or '0.10' (or 'v2'). */
  compat?: '0.10' | '1.1' | 'v2' | 'v3';
  clusterSize?: number;
  refcountBits?: number;
  /** Recorded as given: a relative name is relative to the new image's folder. */
  backingFile?: string;
  backingFormat?: ImageFormat;
  dataFile?: string;
  dataFileRaw?: boolean;
  extendedL2?: boolean;
  lazyRefcounts?: boolean;
  compressionType?: 'zlib' | 'zstd';
  /** Do not open the backing file (qemu-img -u): it need not exist, and `size` is then required. */
  skipBackingCheck?: boolean;
}

/**
 * The size the new image gets: `options.size`, or the backing image's. Checks what qemu-img
 * checks before it prints "Formatting …": the backing file's format is named, the backing file
 * opens (unless skipBackingCheck) and is not the new image itself.
 */
export async function createSize(imagePath: string, options: CreateOptions): Promise<number> {
  check(typeof imagePath === 'string' && imagePath !== '', 'create: path must be a non-empty string');
  const format = options.format ?? 'qcow2';
  check(format === 'qcow2' || format === 'raw', `create: unknown format '${format as string}' (raw, qcow2)`);
  if (options.size !== undefined) checkSize(options.size);
  if (options.backingFile === undefined) return requireSize(options.size);
  if (format === 'raw') throw invalid(`Backing file not supported for file format 'raw'`);
  const backingPath = combineFileName(imagePath, options.backingFile);
  if (options.backingFormat === undefined) throw invalid(await missingBackingFormat(backingPath, options));
  if (await sameFile(imagePath, options.backingFile, backingPath)) {
    throw invalid('Error: Trying to create an image with the same filename as the backing file');
  }
  if (options.skipBackingCheck) return requireSize(options.size);
  const backingSize = await openBackingSize(backingPath, options.backingFormat);
  return options.size ?? backingSize;
}

function invalid(message: string): Qcow2Error {
  return new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, message);
}

function checkSize(size: number): void {
  check(Number.isSafeInteger(size) && size >= 0, `create: size must be an integer from 0 to 2^53 - 1, got ${size}`);
}

function requireSize(size: number | undefined): number {
  if (size === undefined) throw invalid('Image creation needs a size parameter');
  return size;
}

/** qemu-img's refusal of an unnamed backing format, with the format it would have guessed. */
async function missingBackingFormat(backingPath: string, options: CreateOptions): Promise<string> {
  const message = 'Backing file specified without backing format';
  if (options.skipBackingCheck) return message;
  const detected = await probeFormat(backingPath).catch(() => undefined);
  return detected ? `${message}\nDetected format of ${detected}.` : message;
}

/** The backing names the new image: by the same name, or by its real path when both exist. */
async function sameFile(imagePath: string, backingName: string, backingPath: string): Promise<boolean> {
  if (imagePath === backingName) return true;
  const [a, b] = await Promise.all([stat(imagePath).catch(() => undefined), stat(backingPath).catch(() => undefined)]);
  return a !== undefined && b !== undefined && a.dev === b.dev && a.ino === b.ino;
}

/** Open the backing image (following its own chain, as qemu-img does) for its virtual size. */
async function openBackingSize(backingPath: string, format: ImageFormat): Promise<number> {
  try {
    const image = await open(backingPath, { readOnly: true, format, followFileNames: true, cache: 'writeback' });
    const size = image.size;
    await image.close();
    return size;
  } catch (error) {
    const cause = asQcow2Error(error);
    const reason = cause.code.startsWith('E') && !cause.code.startsWith('ERR') ? errnoText(cause).text : cause.message;
    throw new Qcow2Error(cause.code, `Could not open '${backingPath}': ${reason}\nCould not open backing image.`, { cause });
  }
}

/**
 * Check qcow2 creation options the way qemu's qcow2 driver does (the same order, so one bad
 * combination gets the same message) and turn them into createQcow2's options.
 */
export function qcow2CreateOptions(size: number, options: CreateOptions): Qcow2CreateOptions {
  const compatText = options.compat ?? '1.1';
  const compat = COMPAT_LEVELS[compatText];
  if (!compat) throw invalid(`Parameter 'version' does not accept value '${compatText}'`);
  const preallocation = options.preallocation ?? 'off';
  if (!PREALLOCATIONS.includes(preallocation)) throw invalid(`Parameter 'preallocation' does not accept value '${preallocation}'`);
  const compressionType = options.compressionType ?? 'zlib';
  if (compressionType !== 'zlib' && compressionType !== 'zstd') {
    throw invalid(`Parameter 'compression-type' does not accept value '${compressionType as string}'`);
  }
  const v3 = compat === '1.1';
  const need = (what: string) => invalid(`${what} only supported with compatibility level 1.1 and above (use version=v3 or greater)`);
  const clusterSize = options.clusterSize ?? 65536;
  if (!isPowerOfTwo(clusterSize) || clusterSize < MIN_CLUSTER_SIZE || clusterSize > MAX_CLUSTER_SIZE) {
    throw invalid(`Cluster size must be a power of two between ${MIN_CLUSTER_SIZE} and ${MAX_CLUSTER_SIZE / 1024}k`);
  }
  const extendedL2 = options.extendedL2 ?? false;
  if (extendedL2 && !v3) throw need('Extended L2 entries are');
  if (extendedL2 && clusterSize < MIN_EXTENDED_L2_CLUSTER) {
    throw invalid(`Extended L2 entries are only supported with cluster sizes of at least ${MIN_EXTENDED_L2_CLUSTER} bytes`);
  }
  const refcountBits = options.refcountBits ?? 16;
  if (!isPowerOfTwo(refcountBits) || refcountBits > 64) {
    throw invalid('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (!v3 && refcountBits !== 16) {
    throw invalid('Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)');
  }
  const { backingFile, backingFormat, dataFile } = options;
  if (backingFile !== undefined && preallocation !== 'off' && !extendedL2) {
    throw invalid('Backing file and preallocation can only be used at the same time if extended_l2 is on');
  }
  if (backingFile === undefined && backingFormat !== undefined) throw invalid('Backing format cannot be used without backing file');
  const lazyRefcounts = options.lazyRefcounts ?? false;
  if (lazyRefcounts && !v3) throw need('Lazy refcounts');
  const dataFileRaw = options.dataFileRaw ?? false;
  if (dataFileRaw && dataFile === undefined) throw invalid('data-file-raw requires data-file');
  if (dataFileRaw && backingFile !== undefined) throw invalid('Backing file and data-file-raw cannot be used at the same time');
  if (dataFile !== undefined && !v3) throw need('External data files are');
  if (compressionType !== 'zlib' && !v3) throw need('Non-zlib compression type is');
  return {
    size,
    compat,
    clusterSize,
    refcountBits,
    ...(backingFile !== undefined ? { backingFile, backingFormat } : {}),
    ...(dataFile !== undefined ? { dataFile, dataFileRaw } : {}),
    extendedL2,
    lazyRefcounts,
    preallocation,
    compressionType,
  };
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** Options that only qcow2 images have: refused for raw, naming the first one given. */
const QCOW2_ONLY: readonly (keyof CreateOptions)[] = [
  'compat',
  'clusterSize',
  'refcountBits',
  'dataFile',
  'dataFileRaw',
  'extendedL2',
  'lazyRefcounts',
  'compressionType',
];

/**
 * Create the image `imagePath` (replacing a file of that name) like `qemu-img create`: a raw
 * file of `size` bytes, or an empty qcow2 image (with a backing file, the size defaults to its).
 */
export async function create(imagePath: string, options: CreateOptions = {}): Promise<void> {
  // qemu-img makes every image a whole number of 512-byte sectors.
  const size = Math.ceil((await createSize(imagePath, options)) / 512) * 512;
  if ((options.format ?? 'qcow2') === 'raw') {
    const qcow2Only = QCOW2_ONLY.find((key) => options[key] !== undefined);
    if (qcow2Only) throw invalid(`create: option '${qcow2Only}' is for qcow2 images, not raw`);
    await createRaw(imagePath, size, options.preallocation ?? 'off');
    return;
  }
  const qcow2Options = qcow2CreateOptions(size, options);
  try {
    await createQcow2(imagePath, qcow2Options);
  } catch (error) {
    throw couldNotCreate(imagePath, error);
  }
}

/** A failure to make the file reads "Could not create 'PATH': REASON", as in qemu-img. */
function couldNotCreate(imagePath: string, error: unknown): Qcow2Error {
  const cause = asQcow2Error(error);
  const isErrno = /^E[A-Z0-9]+$/.test(cause.code);
  if (!isErrno || cause.message.startsWith('Could not')) return cause;
  return new Qcow2Error(cause.code, `Could not create '${imagePath}': ${errnoText(cause).text}`, { cause });
}

/** Make `imagePath` a raw image of `size` bytes that reads as zero, its space reserved as `preallocation` says. */
export async function createRaw(imagePath: string, size: number, preallocation: Preallocation): Promise<void> {
  if (!PREALLOCATIONS.includes(preallocation)) throw invalid(`invalid parameter value: ${preallocation}`);
  if (preallocation === 'metadata') throw invalid('Unsupported preallocation mode: metadata');
  let file: NativeFile;
  try {
    file = await settle(native.NativeFile.open(imagePath, { writable: true, create: true, cache: 'writeback' }));
  } catch (error) {
    throw couldNotCreate(imagePath, error);
  }
  try {
    // Emptying first drops the old blocks, so that the new image reads as zero.
    await settle(file.truncate(0));
    await growRaw(file, 0, size, preallocation);
    await settle(file.flush());
  } finally {
    await file.close();
  }
}

/**
 * Grow the raw file from `from` to `to` bytes: a hole ('off'), reserved blocks ('falloc'), or
 * written zeroes ('full'), as qemu's file driver does.
 */
export async function growRaw(file: NativeFile, from: number, to: number, preallocation: Preallocation): Promise<void> {
  if (preallocation === 'metadata') throw invalid('Unsupported preallocation mode: metadata');
  if (preallocation === 'falloc' && to > from) {
    await settle(file.allocate('allocate', from, to - from));
  }
  if (preallocation === 'full' && to > from) {
    await writeZeroes(file, from, to);
  }
  await settle(file.truncate(to));
}

/** Write zeroes over [from, to) in 1 MiB requests: blocks really allocated, as 'full' promises. */
async function writeZeroes(file: NativeFile, from: number, to: number): Promise<void> {
  const zeros = allocAligned(Math.min(to - from, 1 << 20));
  for (let pos = from; pos < to; pos += zeros.length) {
    await settle(file.write(zeros.subarray(0, Math.min(zeros.length, to - pos)), pos));
  }
}
