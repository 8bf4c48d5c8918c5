/** The Image interface every format implements, and what they share. */
import { Readable } from 'node:stream';

import { ErrorCodes, Qcow2Error, check } from './errors.js';

/** The image formats this package reads and writes. */
export type ImageFormat = 'raw' | 'qcow2';

/** What a run of guest bytes is backed by. */
export type ExtentKind = 'data' | 'zero' | 'unallocated';

/** A run of guest bytes with one kind; consecutive runs of the same description are merged. */
export interface Extent {
  /** Guest offset of the run. */
  offset: number;
  length: number;
  kind: ExtentKind;
  /** Which image of the backing chain supplies it: 0 is the image itself. */
  depth: number;
  /** Where the data lies in the file of the image at `depth`, when it lies in one place. */
  hostOffset?: number;
  /** The run is stored compressed. */
  compressed?: boolean;
  /** The file that holds the data at `hostOffset`. */
  file?: string;
}

/** The part of the disk extents() describes (default: all of it). */
export interface ExtentOptions {
  offset?: number;
  length?: number;
}

/** Which bytes createReadStream() produces, in what pieces, and how it is stopped. */
export interface ReadStreamOptions {
  /** First byte to read (default 0). */
  start?: number;
  /** Last byte to read, inclusive, as in fs.createReadStream (default: the end of the disk). */
  end?: number;
  /** Bytes per read request (default 1 MiB). */
  chunkSize?: number;
  signal?: AbortSignal;
}

/** How writeZeroes() may store the zeroes. */
export interface WriteZeroesOptions {
  /** Let the image free the space instead of allocating zeroes. */
  unmap?: boolean;
}

/** An open disk image. Offsets and lengths are guest bytes. */
export interface Image extends AsyncDisposable {
  /** The image's format. */
  readonly format: ImageFormat;
  /** The path the image was opened from. */
  readonly path: string;
  /** Virtual disk size in bytes. */
  readonly size: number;
  /** Writes are refused (ERR_QCOW2_READ_ONLY). */
  readonly readOnly: boolean;
  /** Fill `buffer` from guest `offset`; the range must lie inside the disk. */
  read(buffer: Uint8Array, offset: number): Promise<void>;
  /** Write `buffer` at guest `offset`; the range must lie inside the disk. */
  write(buffer: Uint8Array, offset: number): Promise<void>;
  /** Make `length` bytes from `offset` read as zero, without sending the zeroes. */
  writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void>;
  /** Tell the image that a range's contents are no longer needed, so that it may free the space. */
  discard(offset: number, length: number): Promise<void>;
  /** Make everything written so far durable. */
  flush(): Promise<void>;
  /** Close the image (and the backing chain it opened); later calls fail with ERR_QCOW2_CLOSED. */
  close(): Promise<void>;
  /** Runs describing the disk from `offset` for `length` bytes, in order, with no gaps. */
  extents(options?: ExtentOptions): AsyncIterable<Extent>;
  /** A stream of the disk's bytes; zero and unallocated runs are produced without any I/O. */
  createReadStream(options?: ReadStreamOptions): Readable;
}

/** Throw unless [offset, offset + length) lies inside a disk of `size` bytes. Messages are built only on failure: this runs on every request. */
export function checkRange(offset: number, length: number, size: number, what: string): void {
  if (Number.isSafeInteger(offset) && offset >= 0 && Number.isSafeInteger(length) && length >= 0 && offset + length <= size) {
    return;
  }
  check(Number.isSafeInteger(offset) && offset >= 0, `${what}: offset must be a non-negative integer, got ${offset}`);
  check(Number.isSafeInteger(length) && length >= 0, `${what}: length must be a non-negative integer, got ${length}`);
  throw new Qcow2Error(ErrorCodes.OUT_OF_BOUNDS, `${what}: range ${offset}+${length} is past the end of the disk (${size} bytes)`);
}

/** Resolve the extent options against a disk of `size` bytes. */
export function extentRange(options: ExtentOptions | undefined, size: number): { offset: number; end: number } {
  const offset = options?.offset ?? 0;
  const length = options?.length ?? Math.max(0, size - offset);
  checkRange(offset, length, size, 'extents');
  return { offset, end: offset + length };
}

/** A readable stream over `image`, built on extents() and read(): one implementation for every format. */
export function imageReadStream(image: Image, options: ReadStreamOptions = {}): Readable {
  const start = options.start ?? 0;
  const end = options.end === undefined ? image.size : options.end + 1;
  const chunkSize = options.chunkSize ?? 1 << 20;
  check(Number.isSafeInteger(chunkSize) && chunkSize > 0, `chunkSize must be a positive integer, got ${chunkSize}`);
  checkRange(start, Math.max(0, end - start), image.size, 'createReadStream');
  async function* chunks(): AsyncGenerator<Buffer> {
    if (end <= start) return;
    for await (const extent of image.extents({ offset: start, length: end - start })) {
      const extentEnd = extent.offset + extent.length;
      for (let pos = extent.offset; pos < extentEnd; ) {
        options.signal?.throwIfAborted();
        const n = Math.min(chunkSize, extentEnd - pos);
        if (extent.kind === 'data') {
          const buffer = Buffer.allocUnsafe(n);
          await image.read(buffer, pos);
          yield buffer;
        } else {
          yield Buffer.alloc(n);
        }
        pos += n;
      }
    }
  }
  return Readable.from(chunks(), { objectMode: false, highWaterMark: 4 });
}
