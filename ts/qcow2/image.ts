/** Qcow2Image: an open qcow2 image whose reads, mapping and backing chain run in the native engine. */
import { Readable } from 'node:stream';

import { ErrorCodes, Qcow2Error, asQcow2Error, check } from '../errors.js';
import {
  Extent,
  ExtentKind,
  ExtentOptions,
  Image,
  ReadStreamOptions,
  WriteZeroesOptions,
  checkRange,
  extentRange,
  imageReadStream,
} from '../image.js';
import { MAP_RUN_FIELDS, MapFlags, MapKind, NativeFile, Qcow2Engine, native } from '../native.js';
import type { BitmapTracking } from './bitmap-tracking.js';
import type { Qcow2Header } from './header.js';

/**
 * Runs asked of the engine per map() call while iterating extents. Small batches keep the extent
 * objects in V8's young generation: over 200 000 extents, 4096 took half the CPU time and memory of 65536.
 */
const EXTENT_BATCH = 4096;

const KIND_NAMES: Record<number, ExtentKind> = {
  [MapKind.Data]: 'data',
  [MapKind.Zero]: 'zero',
  [MapKind.Unallocated]: 'unallocated',
};

/** The parts a Qcow2Image is made of; open.ts assembles them. */
export interface Qcow2ImageParts {
  path: string;
  readOnly: boolean;
  header: Qcow2Header;
  engine: Qcow2Engine;
  file: NativeFile;
  /** The external data file and its resolved path, when the image has one. */
  dataFile?: { file: NativeFile; path: string };
  backing?: Image;
  /** The persistent bitmaps a writable open keeps up to date. */
  bitmaps?: BitmapTracking;
}

/** One run of an engine map() result, before it becomes an Extent. */
interface Run {
  offset: number;
  length: number;
  kind: number;
  depth: number;
  host: number;
  flags: number;
}

/** Two runs that continue each other exactly, so that one extent describes both. */
function continues(a: Run, b: Run): boolean {
  if (a.offset + a.length !== b.offset || a.kind !== b.kind || a.depth !== b.depth || a.flags !== b.flags) return false;
  if (b.flags & MapFlags.Compressed) return false;
  if ((a.host < 0) !== (b.host < 0)) return false;
  return a.host < 0 || a.host + a.length === b.host;
}

/** Options of Qcow2Image.resize(). */
export interface Qcow2ResizeOptions {
  /** Allow a smaller size: the clusters past the new end are dropped, as qemu-img resize --shrink does. */
  shrink?: boolean;
  /** How the clusters a growth adds get their space (default 'off': none until written). */
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
}

/** An open qcow2 image: reads, writes, zeroes, discards, compressed writes and resizes run in the native engine. */
export class Qcow2Image implements Image {
  readonly format = 'qcow2' as const;
  readonly path: string;
  readonly readOnly: boolean;
  /** The parsed header, as the image was opened. */
  readonly header: Qcow2Header;
  /** The backing image, when the image has one and it was opened. */
  readonly backing: Image | undefined;
  /** Where the external data file is, when the image has one. */
  readonly dataFilePath: string | undefined;
  #engine: Qcow2Engine | undefined;
  #file: NativeFile;
  #dataFile: NativeFile | undefined;
  #inflight = 0;
  #drained: (() => void) | undefined;
  #closing: Promise<void> | undefined;
  #chainFiles: { path: string; dataFile?: string }[] | undefined;
  #size: number;
  #bitmaps: BitmapTracking | undefined;

  constructor(parts: Qcow2ImageParts) {
    this.#bitmaps = parts.bitmaps;
    this.#size = parts.header.size;
    this.path = parts.path;
    this.readOnly = parts.readOnly;
    this.header = parts.header;
    this.backing = parts.backing;
    this.dataFilePath = parts.dataFile?.path;
    this.#engine = parts.engine;
    this.#file = parts.file;
    this.#dataFile = parts.dataFile?.file;
  }

  get size(): number {
    return this.#size;
  }

  /** Bytes per cluster. */
  get clusterSize(): number {
    return this.header.clusterSize;
  }

  /** The persistent bitmaps of a writable open (ts/qcow2/bitmap-tracking.ts); undefined when read-only or inconsistent. */
  get persistentBitmaps(): BitmapTracking | undefined {
    return this.#bitmaps;
  }

  /** The native engine, for an overlay whose engine reads this image directly. */
  get engine(): Qcow2Engine {
    return this.#live();
  }

  #live(): Qcow2Engine {
    if (!this.#engine) throw new Qcow2Error(ErrorCodes.CLOSED, `image '${this.path}' is closed`);
    return this.#engine;
  }

  /** Run a native request, counted so that close() waits for it; rejections become Qcow2Errors. */
  #track<T>(request: Promise<T>): Promise<T> {
    this.#inflight++;
    return request.then(
      (value) => {
        this.#settled();
        return value;
      },
      (error: unknown) => {
        this.#settled();
        throw asQcow2Error(error);
      },
    );
  }

  #settled(): void {
    if (--this.#inflight === 0) this.#drained?.();
  }

  /** Not an async function: the hot path of random reads pays for every promise it makes. */
  read(buffer: Uint8Array, offset: number): Promise<void> {
    try {
      const engine = this.#live();
      check(buffer instanceof Uint8Array, 'read: buffer must be a Buffer or Uint8Array');
      checkRange(offset, buffer.byteLength, this.size, 'read');
      if (buffer.byteLength === 0) return Promise.resolve();
      return this.#track(engine.read(buffer, offset));
    } catch (error) {
      return Promise.reject(asQcow2Error(error));
    }
  }

  /** The engine, when the image is open for writing. */
  #writable(what: string): Qcow2Engine {
    const engine = this.#live();
    if (this.readOnly) throw new Qcow2Error(ErrorCodes.READ_ONLY, `${what}: image '${this.path}' is read-only`);
    return engine;
  }

  /** Write `buffer` at guest `offset`. Not an async function, like read(). */
  write(buffer: Uint8Array, offset: number): Promise<void> {
    try {
      const engine = this.#writable('write');
      check(buffer instanceof Uint8Array, 'write: buffer must be a Buffer or Uint8Array');
      checkRange(offset, buffer.byteLength, this.size, 'write');
      if (buffer.byteLength === 0) return Promise.resolve();
      return this.#track(engine.write(buffer, offset));
    } catch (error) {
      return Promise.reject(asQcow2Error(error));
    }
  }

  /** Make [offset, offset + length) read as zeros; with `unmap` whole clusters give their host space back. */
  async writeZeroes(offset: number, length: number, options: WriteZeroesOptions = {}): Promise<void> {
    const engine = this.#writable('writeZeroes');
    checkRange(offset, length, this.size, 'writeZeroes');
    if (length === 0) return;
    await this.#track(engine.writeZeroes(offset, length, { unmap: options.unmap ?? false }));
  }

  /** Drop the whole clusters of the range (partial clusters at its edges are left alone, as QEMU does). */
  async discard(offset: number, length: number): Promise<void> {
    const engine = this.#writable('discard');
    checkRange(offset, length, this.size, 'discard');
    if (length === 0) return;
    await this.#track(engine.discard(offset, length));
  }

  /**
   * Write whole clusters compressed (offset cluster-aligned, length a multiple of the cluster size,
   * or reaching the end of the disk); clusters that do not shrink are stored uncompressed. Large
   * buffers are split so that every worker thread compresses a part.
   */
  async writeCompressed(buffer: Uint8Array, offset: number): Promise<void> {
    const engine = this.#writable('writeCompressed');
    check(buffer instanceof Uint8Array, 'writeCompressed: buffer must be a Buffer or Uint8Array');
    checkRange(offset, buffer.byteLength, this.size, 'writeCompressed');
    const cs = this.clusterSize;
    const aligned = offset % cs === 0 && (buffer.byteLength % cs === 0 || offset + buffer.byteLength === this.size);
    check(aligned, `writeCompressed: ${buffer.byteLength} bytes at offset ${offset} are not whole clusters of ${cs} bytes`);
    const perPart = Math.max(1, Math.ceil(buffer.byteLength / cs / native.poolThreads)) * cs;
    const parts: Promise<void>[] = [];
    for (let at = 0; at < buffer.byteLength; at += perPart) {
      const part = buffer.subarray(at, Math.min(at + perPart, buffer.byteLength));
      parts.push(this.#track(engine.writeCompressed(part, offset + at)));
    }
    await Promise.all(parts);
  }

  /** Make everything written so far durable. */
  async flush(): Promise<void> {
    const engine = this.#live();
    if (this.readOnly) return;
    await this.#track(engine.flush());
  }

  /** Grow the disk, or with { shrink: true } shrink it, like qemu-img resize. */
  async resize(size: number, options: Qcow2ResizeOptions = {}): Promise<void> {
    const engine = this.#writable('resize');
    check(Number.isSafeInteger(size) && size >= 0, `resize: size must be a non-negative integer, got ${size}`);
    const preallocation = options.preallocation ?? 'off';
    check(['off', 'metadata', 'falloc', 'full'].includes(preallocation), `resize: invalid preallocation mode '${preallocation}'`);
    if (size < this.size && !options.shrink) {
      throw new Qcow2Error(
        ErrorCodes.INVALID_ARGUMENT,
        `resize: shrinking '${this.path}' from ${this.size} to ${size} bytes needs { shrink: true }`,
      );
    }
    const inconsistent = this.#bitmaps?.inconsistent[0];
    if (inconsistent !== undefined) {
      // As qemu-img resize refuses: an in-use bitmap cannot follow the new size.
      throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `Bitmap '${inconsistent}' is inconsistent and cannot be used`);
    }
    await this.#track(engine.resize(size, { shrink: options.shrink ?? false, preallocation }));
    this.#size = size;
  }

  /** Close the image and its backing chain, once the requests already running have finished. */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    const engine = this.#engine;
    if (!engine) return;
    this.#engine = undefined;
    if (this.#inflight > 0) await new Promise<void>((resolve) => (this.#drained = resolve));
    // Bitmaps go back to disk before the engine's last flush; a failure leaves them in use (inconsistent).
    const stored = await Promise.allSettled([this.#bitmaps?.store(engine, this.#file, this.path)]);
    // The engine flushes what it wrote before the files it writes to may close.
    const closed = [...stored, ...(await Promise.allSettled([engine.close()]))];
    const results = [...closed, ...(await Promise.allSettled([this.#file.close(), this.#dataFile?.close()]))];
    const backing = await Promise.allSettled([this.backing?.close()]);
    for (const r of [...results, ...backing]) {
      if (r.status === 'rejected') throw asQcow2Error(r.reason);
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** The file holding the data of a run found at `depth` of this image's chain. */
  fileAt(depth: number, flags: number): string {
    const files = (this.#chainFiles ??= this.#listChainFiles());
    const at = files[Math.min(depth, files.length - 1)];
    return flags & MapFlags.DataFile && at.dataFile ? at.dataFile : at.path;
  }

  /** The image file (and data file) at each depth of the chain, looked up once. */
  #listChainFiles(): { path: string; dataFile?: string }[] {
    const files: { path: string; dataFile?: string }[] = [];
    for (let image: Image | undefined = this; image; ) {
      const qcow2: Qcow2Image | undefined = image instanceof Qcow2Image ? image : undefined;
      files.push({ path: image.path, dataFile: qcow2?.dataFilePath });
      image = qcow2?.backing;
    }
    return files;
  }

  #extent(run: Run): Extent {
    const extent: Extent = { offset: run.offset, length: run.length, kind: KIND_NAMES[run.kind], depth: run.depth };
    if (run.host >= 0) {
      extent.hostOffset = run.host;
      extent.file = this.fileAt(run.depth, run.flags);
    }
    if (run.flags & MapFlags.Compressed) extent.compressed = true;
    return extent;
  }

  /**
   * Runs of data, zeros and unallocated space, with the depth of the chain each comes from.
   * A hand-written iterator over batches of the engine's map(): an async generator would cost
   * several promise turns per extent, which adds up over hundreds of thousands of extents.
   */
  extents(options?: ExtentOptions): AsyncIterable<Extent> {
    return { [Symbol.asyncIterator]: () => this.#extentIterator(options) };
  }

  /**
   * The engine's runs over a range, in batches of up to `batchRuns` runs of MAP_RUN_FIELDS numbers
   * (offset, length, kind, depth, host offset or -1, flags); the next batch is mapped while one is consumed.
   */
  async *runBatches(options?: ExtentOptions, batchRuns = EXTENT_BATCH): AsyncGenerator<Float64Array> {
    const range = extentRange(options, this.size);
    let pos = range.offset;
    let ahead: Promise<Float64Array> | undefined;
    while (pos < range.end) {
      const runs = await (ahead ?? this.#track(this.#live().map(pos, range.end - pos, batchRuns)));
      ahead = undefined;
      if (runs.length === 0) throw new Qcow2Error(ErrorCodes.CORRUPT, `mapping '${this.path}' at offset ${pos} made no progress`);
      pos = runs[runs.length - MAP_RUN_FIELDS] + runs[runs.length - MAP_RUN_FIELDS + 1];
      if (pos < range.end) {
        // A consumer that stops early just drops this one.
        ahead = this.#track(this.#live().map(pos, range.end - pos, batchRuns));
        ahead.catch(() => undefined);
      }
      yield runs;
    }
  }

  #extentIterator(options: ExtentOptions | undefined): AsyncIterator<Extent> {
    let batches: AsyncGenerator<Float64Array> | undefined;
    let stopped = false;
    let held: Run | undefined;
    let ready: Extent[] = [];
    let index = 0;
    const finished: IteratorResult<Extent> = { done: true, value: undefined };
    /** Map the next batch, turning every run but the last (which may continue) into an extent. */
    const fill = async (): Promise<IteratorResult<Extent>> => {
      if (stopped) return finished;
      batches ??= this.runBatches(options);
      ready = [];
      index = 0;
      while (ready.length === 0) {
        const next = await batches.next();
        if (next.done) {
          if (held) ready.push(this.#extent(held));
          held = undefined;
          break;
        }
        const runs = next.value;
        for (let i = 0; i < runs.length; i += MAP_RUN_FIELDS) {
          const run: Run = {
            offset: runs[i],
            length: runs[i + 1],
            kind: runs[i + 2],
            depth: runs[i + 3],
            host: runs[i + 4],
            flags: runs[i + 5],
          };
          if (held && continues(held, run)) {
            held.length += run.length;
          } else {
            if (held) ready.push(this.#extent(held));
            held = run;
          }
        }
      }
      return index < ready.length ? { done: false, value: ready[index++] } : finished;
    };
    return {
      next: () => (index < ready.length ? Promise.resolve({ done: false, value: ready[index++] }) : fill()),
      return: async () => {
        stopped = true;
        ready = [];
        await batches?.return(undefined);
        return finished;
      },
    };
  }

  createReadStream(options?: ReadStreamOptions): Readable {
    return imageReadStream(this, options);
  }
}
