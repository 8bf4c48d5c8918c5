/**
 * Committing an overlay into its backing file (library side of `qcow2 commit`), as qemu-img
 * commit does: every stretch the images above the base supply (data, and zeros as zeros) is
 * written into the base, which grows to the overlay's size when it is smaller; then the overlay
 * is emptied, so that it reads through to the base, unless told to keep it (or a deeper base
 * was named, which leaves the images above it as they are, as qemu-img -b does).
 */
import { setTimeout as sleep } from 'node:timers/promises';

import { ErrorCodes, Qcow2Error, check as checkArgument, settle } from '../errors.js';
import type { Image, ImageFormat } from '../image.js';
import { CacheMode, allocAligned, native } from '../native.js';
import { open } from '../open.js';
import { Qcow2Image } from '../qcow2/image.js';
import { cString, combineFileName } from '../qcow2/text.js';
import { chainOf, fileIdentity, openChainImage } from './chain-open.js';
import { check, checkExitCode } from './check.js';
import { suppliedAbove } from './rebase.js';
import { resizeImage } from './resize.js';

/** Largest piece read from the overlay and written into the base at once. */
const COMMIT_CHUNK = 2 << 20;

/** Pieces in flight at once. */
const COMMIT_PARALLEL = 4;

/** What commit does. */
export interface CommitOptions {
  /** The image's format (probed when left out). */
  format?: ImageFormat;
  /**
   * The image to commit into: a name of an image of the chain (relative names are looked up
   * beside each image, as qemu does). Default: the image's own backing file. Naming one keeps
   * the overlay (qemu-img's -b implies -d).
   */
  base?: string;
  /** Leave the overlay as it is (qemu-img -d) instead of emptying it. */
  keepOverlay?: boolean;
  /** Host cache of the images (qemu-img -t; default 'writeback'). */
  cache?: CacheMode;
  /** Bytes per second at most (qemu-img -r); 0 or absent: no limit. */
  rateLimit?: number;
  /** Follow the backing and data file names images record (default false; the CLI sets it). */
  followFileNames?: boolean;
  signal?: AbortSignal;
  /** Called once the image is open, before the chain is looked at (qemu-img -p starts its display there). */
  onOpened?: () => void;
  /** Called as data is committed: `done` of `total` bytes. */
  onProgress?: (done: number, total: number) => void;
}

/** A stretch to write into the base: the overlay's data, or zeros. */
interface Piece {
  offset: number;
  length: number;
  data: boolean;
}

/**
 * Commit the image at `path` into its backing file (or `options.base`), like qemu-img commit.
 * Failures carry qemu-img's messages ("Image does not have a backing file", "Did not find '…'
 * in the backing chain of '…'").
 */
export async function commit(path: string, options: CommitOptions = {}): Promise<void> {
  const rate = options.rateLimit ?? 0;
  checkArgument(Number.isSafeInteger(rate) && rate >= 0, `commit: rateLimit must be a non-negative integer, got ${rate}`);
  const top = await openChainImage(path, {
    format: options.format,
    readOnly: true,
    cache: options.cache,
    backingCache: options.cache,
    followFileNames: options.followFileNames,
  });
  try {
    options.onOpened?.();
    const chain = chainOf(top);
    if (chain.length < 2) throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, 'Image does not have a backing file');
    const baseDepth = options.base === undefined ? 1 : await findInChain(chain, options.base);
    const pieces = await piecesAbove(top, baseDepth);
    await commitInto(chain[baseDepth], top, pieces, options);
  } finally {
    await top.close();
  }
  if (options.base === undefined && !options.keepOverlay) await emptyImage(path, options);
}

/** Depth of the image named `name` in `chain` (below the top), or qemu-img's error. */
async function findInChain(chain: Image[], name: string): Promise<number> {
  for (let depth = 1; depth < chain.length; depth++) {
    const above = chain[depth - 1];
    const recorded = above instanceof Qcow2Image ? above.header.backingFile : undefined;
    if (recorded !== undefined && cString(recorded) === name) return depth;
    const named = await fileIdentity(combineFileName(above.path, name));
    if (named !== undefined && named === (await fileIdentity(chain[depth].path))) return depth;
  }
  throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `Did not find '${name}' in the backing chain of '${chain[0].path}'`);
}

/** The stretches the images above depth `baseDepth` supply, merged where they continue each other. */
async function piecesAbove(top: Image, baseDepth: number): Promise<Piece[]> {
  const pieces: Piece[] = [];
  for await (const e of top.extents()) {
    if (!suppliedAbove(e, baseDepth)) continue;
    const data = e.kind === 'data';
    const last = pieces[pieces.length - 1];
    if (last && last.data === data && last.offset + last.length === e.offset) last.length += e.length;
    else pieces.push({ offset: e.offset, length: e.length, data });
  }
  return pieces;
}

/** Open the base writable (without its own backing chain: nothing is read from it), grow it if needed, and write the pieces. */
async function commitInto(baseInChain: Image, top: Image, pieces: Piece[], options: CommitOptions): Promise<void> {
  // Its own backing chain stays attached: a partial write into an unallocated cluster copies the rest from it.
  const base = await open(baseInChain.path, {
    format: baseInChain.format,
    readOnly: false,
    cache: options.cache ?? 'writeback',
    followFileNames: options.followFileNames ?? false,
  });
  try {
    if (base.size < top.size) await resizeImage(base, top.size);
    await writePieces(top, base, pieces, options);
    await base.flush();
  } finally {
    await base.close();
  }
}

/** Split the pieces into requests of at most COMMIT_CHUNK bytes of data (zero runs stay whole). */
function* requests(pieces: Piece[]): Generator<Piece> {
  for (const piece of pieces) {
    if (!piece.data) {
      yield piece;
      continue;
    }
    for (let at = 0; at < piece.length; at += COMMIT_CHUNK) {
      yield { offset: piece.offset + at, length: Math.min(COMMIT_CHUNK, piece.length - at), data: true };
    }
  }
}

/** Copy every piece from `top` into `base`, COMMIT_PARALLEL requests at a time, within the rate limit. */
async function writePieces(top: Image, base: Image, pieces: Piece[], options: CommitOptions): Promise<void> {
  const total = pieces.reduce((sum, p) => sum + p.length, 0);
  const rate = options.rateLimit ?? 0;
  const started = Date.now();
  let issued = 0;
  let done = 0;
  const queue = requests(pieces);
  let failed = false;
  const worker = async (): Promise<void> => {
    const buffer = allocAligned(COMMIT_CHUNK);
    for (let next = queue.next(); !next.done && !failed; next = queue.next()) {
      options.signal?.throwIfAborted();
      const piece = next.value;
      issued += piece.length;
      // A limited commit starts each request no earlier than the limit allows for the bytes issued before it.
      if (rate > 0) await sleep(Math.max(0, started + ((issued - piece.length) / rate) * 1000 - Date.now()));
      if (piece.data) {
        const slice = buffer.subarray(0, piece.length);
        await top.read(slice, piece.offset);
        await base.write(slice, piece.offset);
      } else {
        await base.writeZeroes(piece.offset, piece.length, { unmap: true });
      }
      done += piece.length;
      options.onProgress?.(done, total);
    }
  };
  const guarded = () =>
    worker().catch((error: unknown) => {
      failed = true;
      throw error;
    });
  await Promise.all(Array.from({ length: COMMIT_PARALLEL }, guarded));
}

/**
 * Make every cluster of the image unallocated, so that it reads through to its backing file.
 * Opened without its backing file, a discard unmaps clusters that hold no data and turns data
 * clusters into zero clusters (version 3); a second pass unmaps those too. The file is then cut
 * after its last cluster in use, as qemu's emptying leaves it small.
 */
async function emptyImage(path: string, options: CommitOptions): Promise<void> {
  const image = await open(path, {
    format: options.format,
    readOnly: false,
    backing: false,
    cache: options.cache ?? 'writeback',
    followFileNames: options.followFileNames ?? false,
  });
  try {
    if (!(image instanceof Qcow2Image)) return;
    for (let pass = 0; pass < 2; pass++) await image.discard(0, image.size);
    await image.flush();
  } finally {
    await image.close();
  }
  await cutAfterLastCluster(path, options.cache);
}

/** Truncate the qcow2 file at `path` after the last cluster its refcounts count as used, when its metadata checks clean. */
async function cutAfterLastCluster(path: string, cache: CacheMode = 'writeback'): Promise<void> {
  const result = await check(path, { format: 'qcow2', cache });
  const end = result.imageEndOffset;
  if (checkExitCode(result) !== 0 || end === undefined) return;
  const file = await settle(native.NativeFile.open(path, { writable: true, cache }));
  try {
    if ((await settle(file.size())) > end) {
      await settle(file.truncate(end));
      await settle(file.flush());
    }
  } finally {
    await file.close();
  }
}
