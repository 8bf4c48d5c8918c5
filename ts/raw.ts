/** Raw images: the guest disk is the file, byte for byte. */
import { Readable } from 'node:stream';

import { ErrorCodes, Qcow2Error, settle } from './errors.js';
import {
  Extent,
  ExtentOptions,
  Image,
  ReadStreamOptions,
  WriteZeroesOptions,
  checkRange,
  extentRange,
  imageReadStream,
} from './image.js';
import { CacheMode, NativeFile, native } from './native.js';

/**
 * The guest size of a raw file: its length rounded up to whole 512-byte sectors, as QEMU sees
 * it (the bytes of the last partial sector past the end of the file read as zero).
 */
export function rawDiskSize(fileSize: number): number {
  return Math.ceil(fileSize / 512) * 512;
}

/** Data runs asked of the file per native call when listing extents. */
const RUNS_PER_CALL = 8192;

/** How RawImage.open() opens the file: read-only or not, and its host cache mode (default 'none'). */
export interface RawOpenOptions {
  readOnly?: boolean;
  cache?: CacheMode;
}

/** A raw image over a native file. */
export class RawImage implements Image {
  readonly format = 'raw' as const;
  readonly readOnly: boolean;
  #size: number;
  #file: NativeFile | undefined;

  private constructor(
    readonly path: string,
    file: NativeFile,
    size: number,
    readOnly: boolean,
  ) {
    this.#file = file;
    this.#size = size;
    this.readOnly = readOnly;
  }

  /** Open `path` as a raw image. */
  static async open(path: string, options: RawOpenOptions = {}): Promise<RawImage> {
    const readOnly = options.readOnly ?? false;
    const file = await settle(native.NativeFile.open(path, { writable: !readOnly, cache: options.cache ?? 'none' }));
    return new RawImage(path, file, rawDiskSize(await settle(file.size())), readOnly);
  }

  /** Wrap a file the caller already opened (the image takes ownership). */
  static async fromFile(path: string, file: NativeFile): Promise<RawImage> {
    return new RawImage(path, file, rawDiskSize(await settle(file.size())), !file.info.writable);
  }

  get size(): number {
    return this.#size;
  }

  /** The native file, for engines that read this image directly (a raw backing file). */
  get file(): NativeFile {
    return this.#live();
  }

  #live(): NativeFile {
    if (!this.#file) throw new Qcow2Error(ErrorCodes.CLOSED, `image '${this.path}' is closed`);
    return this.#file;
  }

  #writable(what: string): NativeFile {
    const file = this.#live();
    if (this.readOnly) throw new Qcow2Error(ErrorCodes.READ_ONLY, `${what}: image '${this.path}' is read-only`);
    return file;
  }

  async read(buffer: Uint8Array, offset: number): Promise<void> {
    checkRange(offset, buffer.byteLength, this.#size, 'read');
    await settle(this.#live().read(buffer, offset));
  }

  async write(buffer: Uint8Array, offset: number): Promise<void> {
    const file = this.#writable('write');
    checkRange(offset, buffer.byteLength, this.#size, 'write');
    await settle(file.write(buffer, offset));
  }

  async writeZeroes(offset: number, length: number, options: WriteZeroesOptions = {}): Promise<void> {
    const file = this.#writable('writeZeroes');
    checkRange(offset, length, this.#size, 'writeZeroes');
    if (length === 0) return;
    try {
      await settle(file.allocate(options.unmap ? 'punch' : 'zero', offset, length));
    } catch (error) {
      if ((error as Qcow2Error).code !== 'EOPNOTSUPP') throw error;
      await this.#writeZeroBuffers(file, offset, length);
    }
  }

  async #writeZeroBuffers(file: NativeFile, offset: number, length: number): Promise<void> {
    const zeros = native.allocAligned(Math.min(length, 1 << 20));
    for (let pos = offset; pos < offset + length; pos += zeros.length) {
      const n = Math.min(zeros.length, offset + length - pos);
      await settle(file.write(zeros.subarray(0, n), pos));
    }
  }

  /** Discard is advisory: the file system punches the range out where it can, and then it reads as zero. */
  async discard(offset: number, length: number): Promise<void> {
    const file = this.#writable('discard');
    checkRange(offset, length, this.#size, 'discard');
    if (length === 0) return;
    try {
      await settle(file.allocate('punch', offset, length));
    } catch (error) {
      if ((error as Qcow2Error).code !== 'EOPNOTSUPP') throw error;
    }
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    await settle(this.#live().flush());
  }

  /** Change the size of the file to exactly `size` bytes; growing adds a hole that reads as zero. */
  async resize(size: number): Promise<void> {
    const file = this.#writable('resize');
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `resize: size must be a non-negative integer, got ${size}`);
    }
    await settle(file.truncate(size));
    this.#size = rawDiskSize(size);
  }

  async close(): Promise<void> {
    const file = this.#file;
    this.#file = undefined;
    if (file) await settle(file.close());
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /**
   * Data and holes from SEEK_DATA/SEEK_HOLE: holes, and the rest of the last sector past the end
   * of the file, read as zero.
   */
  async *extents(options?: ExtentOptions): AsyncGenerator<Extent> {
    const file = this.#live();
    const { offset, end } = extentRange(options, this.#size);
    let pos = offset;
    for (;;) {
      const runs = await settle(file.dataRuns(pos, end, RUNS_PER_CALL));
      for (let i = 0; i < runs.length; i += 2) {
        if (runs[i] > pos) yield { offset: pos, length: runs[i] - pos, kind: 'zero', depth: 0 };
        yield { offset: runs[i], length: runs[i + 1] - runs[i], kind: 'data', depth: 0, hostOffset: runs[i], file: this.path };
        pos = runs[i + 1];
      }
      if (runs.length < 2 * RUNS_PER_CALL) break;
    }
    if (pos < end) yield { offset: pos, length: end - pos, kind: 'zero', depth: 0 };
  }

  createReadStream(options?: ReadStreamOptions): Readable {
    return imageReadStream(this, options);
  }
}
