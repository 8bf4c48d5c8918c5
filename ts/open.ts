/** Opening images: format probing, the file-name gate, and dispatch to the format. */
import { constants } from 'node:fs';
import { open as fsOpen } from 'node:fs/promises';

import { ErrorCodes, Qcow2Error, asQcow2Error } from './errors.js';
import { Image, ImageFormat } from './image.js';
import { CacheMode, CACHE_MODES } from './native.js';
import type * as Qcow2Open from './qcow2/open.js';
import type * as Raw from './raw.js';

/** The qcow2 magic, "QFI\xfb". */
export const QCOW2_MAGIC = 0x514649fb;

/** Backing chains deeper than this are refused (an image plus 64 backing layers). */
export const DEFAULT_MAX_CHAIN_DEPTH = 64;

/** How open() opens an image and its backing chain. */
export interface OpenOptions {
  /** Open for reading only (default false). */
  readOnly?: boolean;
  /** The format; probed from the file's first bytes when left out (qcow2 by magic, else raw). */
  format?: ImageFormat;
  /** Host cache mode of the image file (default 'none': O_DIRECT). */
  cache?: CacheMode;
  /** Host cache mode of backing files (default: the same as `cache`). */
  backingCache?: CacheMode;
  /**
   * Follow file names the image carries: its backing file and external data file. Off by
   * default in the library, because an image from elsewhere could name any file on this
   * machine; the CLI turns it on, like qemu-img.
   */
  followFileNames?: boolean;
  /** Open the backing chain (default true). Without it, unallocated clusters read as zero. */
  backing?: boolean;
  /** The deepest backing chain accepted (default 64). */
  maxChainDepth?: number;
  /** Backing format to use for the image's backing file instead of the one it records. */
  backingFormat?: ImageFormat;
}

/** Probe the format of `path` from its first bytes. */
export async function probeFormat(path: string): Promise<ImageFormat> {
  let handle;
  try {
    // Non-blocking: opening a FIFO would otherwise wait for a writer; FIFOs and sockets hold no image.
    handle = await fsOpen(path, constants.O_RDONLY | constants.O_NONBLOCK);
    const stat = await handle.stat();
    if (stat.isFIFO() || stat.isSocket()) {
      throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `'file' driver requires '${path}' to be a regular file`);
    }
    const magic = Buffer.alloc(4);
    const { bytesRead } = await handle.read(magic, 0, 4, 0);
    return bytesRead === 4 && magic.readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
  } catch (error) {
    throw asQcow2Error(error);
  } finally {
    await handle?.close();
  }
}

/** Check the options every opener shares. */
export function checkOpenOptions(options: OpenOptions): void {
  for (const key of ['cache', 'backingCache'] as const) {
    const mode = options[key];
    if (mode !== undefined && !CACHE_MODES.includes(mode)) {
      throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `${key} must be one of ${CACHE_MODES.join(', ')}, got '${mode}'`);
    }
  }
  for (const key of ['format', 'backingFormat'] as const) {
    const format = options[key];
    if (format !== undefined && format !== 'raw' && format !== 'qcow2') {
      throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `unknown ${key} '${format}' (raw, qcow2)`);
    }
  }
  const depth = options.maxChainDepth;
  if (depth !== undefined && !(Number.isSafeInteger(depth) && depth >= 0)) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `maxChainDepth must be a non-negative integer, got ${depth}`);
  }
}

/** Open a disk image of any supported format. */
export async function open(path: string, options: OpenOptions = {}): Promise<Image> {
  if (typeof path !== 'string' || path === '') {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, 'open: path must be a non-empty string');
  }
  checkOpenOptions(options);
  const format = options.format ?? (await probeFormat(path));
  // Loaded on first use: `qcow2 check` and `info` probe formats here without opening an image.
  if (format === 'qcow2') return (require('./qcow2/open.js') as typeof Qcow2Open).openQcow2(path, options);
  return (require('./raw.js') as typeof Raw).RawImage.open(path, { readOnly: options.readOnly, cache: options.cache });
}
