/** The typed face of the C++ addon: every native call is declared once here. */
import path from 'node:path';

/** qemu-img's host cache modes (-t/-T). `none` and `directsync` use O_DIRECT. */
export type CacheMode = 'none' | 'writeback' | 'unsafe' | 'directsync' | 'writethrough';

export const CACHE_MODES: readonly CacheMode[] = ['none', 'writeback', 'unsafe', 'directsync', 'writethrough'];

export interface NativeFileOptions {
  writable?: boolean;
  /** Create the file when it does not exist (never truncates). */
  create?: boolean;
  cache?: CacheMode;
}

/** How a file was opened, as discovered by the addon. */
export interface NativeFileInfo {
  path: string;
  writable: boolean;
  cache: CacheMode;
  /** O_DIRECT is in use. */
  direct: boolean;
  /** O_DIRECT was asked for, the file system refused it, and buffered I/O is used instead. */
  directFallback: boolean;
  blockDevice: boolean;
  /** Alignment of buffer addresses for O_DIRECT (1 when buffered). */
  memAlign: number;
  /** Alignment of offsets and lengths for O_DIRECT (1 when buffered). */
  reqAlign: number;
}

/** A file opened by the addon; every call runs on the addon's thread pool. Any offset and length work. */
export interface NativeFile {
  readonly info: NativeFileInfo;
  /** Fill `buffer` from `offset`; bytes past the end of the file read as zero. */
  read(buffer: Uint8Array, offset: number): Promise<void>;
  write(buffer: Uint8Array, offset: number): Promise<void>;
  readv(buffers: Uint8Array[], offset: number): Promise<void>;
  writev(buffers: Uint8Array[], offset: number): Promise<void>;
  /** fdatasync, except in cache mode `unsafe`. */
  flush(): Promise<void>;
  allocate(mode: 'allocate' | 'punch' | 'zero', offset: number, length: number): Promise<void>;
  truncate(size: number): Promise<void>;
  size(): Promise<number>;
  /** Bytes the file occupies on disk (st_blocks × 512). */
  allocatedBytes(): Promise<number>;
  /** The next offset ≥ `offset` holding data, or the file size when there is none. */
  seekData(offset: number): Promise<number>;
  /** The next offset ≥ `offset` in a hole, or the file size. */
  seekHole(offset: number): Promise<number>;
  close(): Promise<void>;
}

export interface NativeFileConstructor {
  open(path: string, options?: NativeFileOptions): Promise<NativeFile>;
}

/** Everything the addon exports. */
export interface NativeAddon {
  NativeFile: NativeFileConstructor;
  /** A zero-filled Buffer over memory aligned to `bufferAlign`, from the addon's pool. */
  allocAligned(size: number): Buffer;
  bufferAlign: number;
  poolThreads: number;
}

// eslint-disable-next-line @typescript-eslint/no-require-imports
export const native: NativeAddon = require(path.join(__dirname, '..', '..', 'build', 'Release', 'qcow2_native.node'));

export const allocAligned = (size: number): Buffer => native.allocAligned(size);
