/** qemu's guard for raw images whose format was guessed: no write may make the first sector look like qcow2. */
import { Readable } from 'node:stream';

import { Qcow2Error } from '../../errors.js';
import type { Extent, ExtentOptions, Image, ReadStreamOptions, WriteZeroesOptions } from '../../image.js';
import { allocAligned } from '../../native.js';
import { QCOW2_MAGIC } from '../../open.js';

/** qemu's warning when the format of an image opened for writing was guessed as raw. */
export function rawProbeWarning(path: string): string {
  return (
    `WARNING: Image format was not specified for '${path}' and probing guessed raw.\n` +
    '         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n' +
    "         Specify the 'raw' format explicitly to remove the restrictions.\n"
  );
}

/** The bytes format probing looks at. */
const PROBED_BYTES = 512;

/**
 * A probed raw image: writes that would turn its first sector into a qcow2 header are refused with
 * EPERM (otherwise the next probe would open the disk as a qcow2 image). Everything else passes through.
 */
export class ProbedRawImage implements Image {
  readonly format = 'raw' as const;

  /** The image the guard passes requests to (the CLI unwraps it for resizing). */
  constructor(readonly inner: Image) {}

  get path(): string {
    return this.inner.path;
  }

  get size(): number {
    return this.inner.size;
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  read(buffer: Uint8Array, offset: number): Promise<void> {
    return this.inner.read(buffer, offset);
  }

  /** The first sector as it would be after writing `buffer` at `offset`. */
  async #sectorAfter(buffer: Uint8Array, offset: number): Promise<Buffer> {
    const sector = allocAligned(PROBED_BYTES);
    await this.inner.read(sector.subarray(0, Math.min(PROBED_BYTES, this.size)), 0);
    const end = Math.min(PROBED_BYTES, offset + buffer.length);
    sector.set(buffer.subarray(0, end - offset), offset);
    return sector;
  }

  async write(buffer: Uint8Array, offset: number): Promise<void> {
    if (offset < PROBED_BYTES && buffer.length > 0 && offset + buffer.length <= this.size) {
      const sector = await this.#sectorAfter(buffer, offset);
      if (sector.readUInt32BE(0) === QCOW2_MAGIC) {
        throw new Qcow2Error('EPERM', `write: the first sector of probed raw image '${this.path}' would look like a qcow2 header`);
      }
    }
    return this.inner.write(buffer, offset);
  }

  writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void> {
    return this.inner.writeZeroes(offset, length, options);
  }

  discard(offset: number, length: number): Promise<void> {
    return this.inner.discard(offset, length);
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.inner.close();
  }

  extents(options?: ExtentOptions): AsyncIterable<Extent> {
    return this.inner.extents(options);
  }

  createReadStream(options?: ReadStreamOptions): Readable {
    return this.inner.createReadStream(options);
  }
}
