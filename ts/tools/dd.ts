/**
 * Copying part of an image into a new one (library side of `qcow2 dd`), with qemu-img dd's
 * semantics: the output holds the input from byte skip × bs up to count × bs (or its end).
 */
import { stat } from 'node:fs/promises';
import { Readable } from 'node:stream';

import { ErrorCodes, Qcow2Error, asQcow2Error, check } from '../errors.js';
import { Extent, ExtentOptions, Image, ImageFormat, checkRange, extentRange, imageReadStream } from '../image.js';
import { open } from '../open.js';
import { convert } from './convert.js';
import { create, createRaw } from './create.js';

const INT64_MAX = (1n << 63n) - 1n;
/** qemu-img dd's largest block size (INT_MAX). */
export const MAX_BLOCK_SIZE = 2 ** 31 - 1;

/** What dd copies and how the output is made. */
export interface DdOptions {
  /** Bytes per block (qemu-img dd's bs=, 1 to 2^31 - 1; default 512). */
  blockSize?: number;
  /** Copy only up to this many blocks from the start of the input (count=; skipped blocks included, as in qemu-img). */
  count?: number | bigint;
  /** Blocks of the input to leave out at its start (skip=). */
  skip?: number | bigint;
  /** Input format, probed when left out (only when `input` is a path). */
  format?: ImageFormat;
  /** Output format: 'raw' (default) or 'qcow2'. */
  outputFormat?: ImageFormat;
  /** Follow the backing and data file names the input records (default false; the CLI sets it). */
  followFileNames?: boolean;
  /** Told when `skip` lies past the end of the input: the output is then empty, as dd(1) makes it. */
  onWarning?: (message: string) => void;
}

/** Which bytes of the input dd copies, and how large the output is. */
export interface DdPlan {
  /** First input byte copied. */
  start: number;
  /** Bytes copied from the input. */
  length: number;
  /** Virtual size of the output: `length` rounded up to whole 512-byte sectors, as qemu creates it. */
  outputSize: number;
  /** `skip` lies past the end of the input (nothing is copied). */
  skippedPastEnd: boolean;
}

function count64(value: number | bigint | undefined, name: string): bigint | undefined {
  if (value === undefined) return undefined;
  const big = typeof value === 'bigint' ? value : Number.isSafeInteger(value) ? BigInt(value) : -1n;
  check(big >= 0n && big <= INT64_MAX, `dd: ${name} must be an integer from 0 to ${INT64_MAX}, got ${value}`);
  return big;
}

/** The range qemu-img dd copies from an input of `inputSize` bytes. */
export function planDd(inputSize: number, options: Pick<DdOptions, 'blockSize' | 'count' | 'skip'> = {}): DdPlan {
  const blockSize = options.blockSize ?? 512;
  check(
    Number.isSafeInteger(blockSize) && blockSize >= 1 && blockSize <= MAX_BLOCK_SIZE,
    `dd: blockSize must be an integer from 1 to ${MAX_BLOCK_SIZE}, got ${blockSize}`,
  );
  const bs = BigInt(blockSize);
  const count = count64(options.count, 'count');
  const skip = count64(options.skip, 'skip');
  let size = BigInt(inputSize);
  if (count !== undefined && count <= INT64_MAX / bs && count * bs < size) size = count * bs;
  const skippedPastEnd = skip !== undefined && (skip > INT64_MAX / bs || size < skip * bs);
  const start = skippedPastEnd ? size : (skip ?? 0n) * bs;
  const length = Number(size - start);
  return { start: Number(start), length, outputSize: Math.ceil(length / 512) * 512, skippedPastEnd };
}

/**
 * Copy the part of `input` that `options` select into a new image `output` (replacing any file
 * there). A path is opened read-only (and closed); an open image stays the caller's.
 */
export async function dd(input: string | Image, output: string, options: DdOptions = {}): Promise<void> {
  const outputFormat = options.outputFormat ?? 'raw';
  check(outputFormat === 'raw' || outputFormat === 'qcow2', `dd: unknown output format '${outputFormat as string}' (raw, qcow2)`);
  const source =
    typeof input === 'string'
      ? await open(input, { readOnly: true, format: options.format, cache: 'writeback', followFileNames: options.followFileNames ?? false })
      : input;
  try {
    const plan = planDd(source.size, options);
    await refuseSameFile(source.path, output);
    await createOutput(output, outputFormat, plan.outputSize);
    if (plan.skippedPastEnd) options.onWarning?.(`${source.path}: cannot skip to specified offset`);
    const window = new ImageWindow(source, plan.start, plan.length, plan.outputSize);
    await convert(window, output, { outputFormat, skipCreate: true, targetIsZero: true, targetCache: 'writeback' });
  } finally {
    if (source !== input) await source.close();
  }
}

/** Creating the output would destroy the input when both are one file: refused as qemu's image locks refuse it. */
async function refuseSameFile(inputPath: string, output: string): Promise<void> {
  const [a, b] = await Promise.all([stat(inputPath).catch(() => undefined), stat(output).catch(() => undefined)]);
  if (a && b && a.dev === b.dev && a.ino === b.ino) {
    throw new Qcow2Error(
      'EAGAIN',
      `${output}: error while creating output image: Failed to get "write" lock\nIs another process using the image [${output}]?`,
    );
  }
}

/** Make the empty output image; a failure reads "OUTPUT: error while creating output image: REASON", as in qemu-img. */
async function createOutput(output: string, format: ImageFormat, size: number): Promise<void> {
  try {
    if (format === 'raw') await createRaw(output, size, 'off');
    else await create(output, { format: 'qcow2', size });
  } catch (error) {
    const cause = asQcow2Error(error);
    throw new Qcow2Error(cause.code, `${output}: error while creating output image: ${cause.message}`, { cause });
  }
}

/**
 * A read-only view of `length` bytes of `source` from `start`, followed by zeros up to `size`:
 * what dd hands to the copy, so that the copy's sparse, parallel machinery does the work.
 */
export class ImageWindow implements Image {
  readonly readOnly = true;

  constructor(
    private readonly source: Image,
    private readonly start: number,
    private readonly length: number,
    readonly size: number,
  ) {
    check(start >= 0 && length >= 0 && start + length <= source.size, `window ${start}+${length} lies outside '${source.path}'`);
    check(size >= length, `window size ${size} is smaller than its ${length} bytes of data`);
  }

  get format(): ImageFormat {
    return this.source.format;
  }

  get path(): string {
    return this.source.path;
  }

  async read(buffer: Uint8Array, offset: number): Promise<void> {
    checkRange(offset, buffer.byteLength, this.size, 'read');
    const inside = Math.max(0, Math.min(buffer.byteLength, this.length - offset));
    if (inside > 0) await this.source.read(buffer.subarray(0, inside), this.start + offset);
    buffer.fill(0, inside);
  }

  async *extents(options?: ExtentOptions): AsyncGenerator<Extent> {
    const { offset, end } = extentRange(options, this.size);
    const dataEnd = Math.min(end, this.length);
    if (offset < dataEnd) {
      for await (const extent of this.source.extents({ offset: this.start + offset, length: dataEnd - offset })) {
        yield { ...extent, offset: extent.offset - this.start };
      }
    }
    const padding = Math.max(offset, this.length);
    if (padding < end) yield { offset: padding, length: end - padding, kind: 'zero', depth: 0 };
  }

  createReadStream(options?: Parameters<Image['createReadStream']>[0]): Readable {
    return imageReadStream(this, options);
  }

  write(): Promise<void> {
    return Promise.reject(this.#readOnly());
  }

  writeZeroes(): Promise<void> {
    return Promise.reject(this.#readOnly());
  }

  discard(): Promise<void> {
    return Promise.reject(this.#readOnly());
  }

  async flush(): Promise<void> {}

  /** The window does not own its source: closing it leaves the source open. */
  async close(): Promise<void> {}

  async [Symbol.asyncDispose](): Promise<void> {}

  #readOnly(): Qcow2Error {
    return new Qcow2Error(ErrorCodes.READ_ONLY, `a window of '${this.source.path}' is read-only`);
  }
}
