/**
 * Changing the backing file of a qcow2 image (library side of `qcow2 rebase`), as qemu-img
 * rebase does: in safe mode every stretch the image does not allocate itself, where the old
 * backing chain and the new backing file read differently, gets the old content written into
 * the image first, so that what the guest sees stays the same; then the header names the new
 * backing file. In unsafe mode only the header changes.
 */
import { ErrorCodes, Qcow2Error, asQcow2Error, check } from '../errors.js';
import type { Extent, Image, ImageFormat } from '../image.js';
import { CacheMode, allocAligned } from '../native.js';
import { open } from '../open.js';
import { rewriteHeader } from '../qcow2/header-update.js';
import { Qcow2Image } from '../qcow2/image.js';
import { cString, combineFileName } from '../qcow2/text.js';
import { chainOf, cleanIfDirty, couldNotOpen, fileIdentity, isErrno, openChainImage } from './chain-open.js';

/** qemu-img rebase's unit of work: at most this many bytes are read from each side at once. */
export const REBASE_CHUNK = 2 << 20;

/** qemu-img's granule of comparison: it writes the differing 512-byte sectors of a unit of work. */
const SECTOR = 512;

/** What rebase does. */
export interface RebaseOptions {
  /** The new backing file name, stored as given (relative names are relative to the image's folder); '' for none. */
  backingFile: string;
  /** The new backing file's format; required unless `backingFile` is ''. */
  backingFormat?: ImageFormat;
  /** Only rewrite the header (qemu-img -u): the image's content then depends on the new backing file being right. */
  unsafe?: boolean;
  /** The image's format (probed when left out); only qcow2 images record a backing file. */
  format?: ImageFormat;
  /** Host cache of the image (qemu-img -t; default 'writeback'). */
  cache?: CacheMode;
  /** Host cache of the backing files read (qemu-img -T; default 'writeback'). */
  sourceCache?: CacheMode;
  /** Follow the backing and data file names images record (default false; the CLI sets it). */
  followFileNames?: boolean;
  signal?: AbortSignal;
  /** Called after each unit of work qemu-img counts: `done` of `total` (qemu-img -p shows done × 100 / total). */
  onProgress?: (done: number, total: number) => void;
}

/** The new backing file, opened for comparison; `depth` > 0 when it is already part of the old chain. */
interface NewBacking {
  image?: Image;
  size: number;
  /** Depth of the new backing file in the image's old chain, or 0 when it is not in it. */
  chainDepth: number;
  owned: boolean;
}

/**
 * Give the image at `path` the backing file `options.backingFile`, like qemu-img rebase.
 * Failures carry qemu-img's messages ("Could not open new backing file '…': …",
 * "Could not change the backing file to '…': …").
 */
export async function rebase(path: string, options: RebaseOptions): Promise<void> {
  check(typeof options.backingFile === 'string', 'rebase: backingFile must be a string (\'\' for none)');
  const image = await openChainImage(path, {
    format: options.format,
    readOnly: options.unsafe ?? false,
    backing: !options.unsafe,
    cache: options.cache,
    backingCache: options.sourceCache,
    followFileNames: options.followFileNames,
  });
  try {
    checkBackingFormat(options);
    if (options.unsafe) {
      checkCanChange(image, options);
    } else {
      const target = await openNewBacking(image, options);
      try {
        checkCanChange(image, options);
        await copyDifferences(image, target, options);
      } finally {
        if (target.owned) await target.image?.close();
      }
    }
  } finally {
    await image.close();
  }
  try {
    if (options.unsafe) await cleanIfDirty(path, { format: 'qcow2', cache: options.cache, followFileNames: options.followFileNames });
    await rewriteHeader(path, (h) => ({
      ...h,
      backingFile: options.backingFile === '' ? undefined : options.backingFile,
      backingFormat: options.backingFile === '' ? undefined : options.backingFormat,
    }));
  } catch (error) {
    throw changeFailure(options.backingFile, error);
  }
}

/** qemu-img's message when the header cannot take the new backing file. */
function changeFailure(name: string, error: unknown): Qcow2Error {
  const cause = asQcow2Error(error);
  const reason = cause.code === 'ENOSPC' ? 'No space left in the file header' : cause.code === 'ENOTSUP' ? 'Operation not supported' : cause.message;
  return new Qcow2Error(cause.code, `Could not change the backing file to '${name}': ${reason}`, { cause });
}

/** Every format name qemu-img 7.2 knows (its "Supported formats" list): names it would open, of which only raw and qcow2 are implemented here. */
const QEMU_FORMATS = (
  'blkdebug blklogwrites blkverify bochs cloop compress copy-before-write copy-on-read dmg file ftp ftps gluster host_cdrom ' +
  'host_device http https iscsi iser luks nbd nfs null-aio null-co nvme parallels preallocate qcow qcow2 qed quorum raw rbd ' +
  'replication snapshot-access ssh throttle vdi vhdx vmdk vpc vvfat'
).split(' ');

/** The new backing format must be one qemu knows ("Invalid format name") and one implemented here. */
function checkBackingFormat(options: RebaseOptions): void {
  const format: string | undefined = options.backingFormat;
  if (format === undefined || format === 'raw' || format === 'qcow2') return;
  if (!QEMU_FORMATS.includes(format)) throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `Invalid format name: '${format}'`);
  throw new Qcow2Error(
    ErrorCodes.UNSUPPORTED,
    `Could not open new backing file '${options.backingFile}': format '${format}' is not supported (only raw and qcow2)`,
  );
}

/** Refuse what the header change at the end would refuse, before any data is written. */
function checkCanChange(image: Image, options: RebaseOptions): void {
  if (!(image instanceof Qcow2Image)) throw changeFailure(options.backingFile, new Qcow2Error('ENOTSUP', 'Operation not supported'));
  if (options.backingFile !== '' && options.backingFormat === undefined) {
    throw changeFailure(options.backingFile, new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, 'backing format must be specified'));
  }
}

/** Open the new backing file read-only (or find it in the old chain), as qemu-img does before copying. */
async function openNewBacking(image: Image, options: RebaseOptions): Promise<NewBacking> {
  if (options.backingFile === '') return { size: 0, chainDepth: 0, owned: false };
  const resolved = combineFileName(image.path, cString(options.backingFile));
  const identity = await fileIdentity(resolved);
  const chain = chainOf(image);
  if (identity !== undefined && identity === (await fileIdentity(image.path))) {
    // qemu-img fails here on its own image lock; a header naming the image itself would make a loop.
    throw new Qcow2Error(
      ErrorCodes.BACKING_LOOP,
      `Could not open new backing file '${options.backingFile}': it is the image being rebased ('${image.path}')`,
    );
  }
  for (let depth = 1; depth < chain.length && identity !== undefined; depth++) {
    if ((await fileIdentity(chain[depth].path)) === identity && (options.backingFormat ?? chain[depth].format) === chain[depth].format) {
      return { image: chain[depth], size: chain[depth].size, chainDepth: depth, owned: false };
    }
  }
  try {
    const backing = await open(resolved, {
      format: options.backingFormat,
      readOnly: true,
      cache: options.sourceCache ?? 'writeback',
      followFileNames: options.followFileNames ?? false,
    });
    return { image: backing, size: backing.size, chainDepth: 0, owned: true };
  } catch (error) {
    const cause = asQcow2Error(error);
    const reason = isErrno(cause.code) ? couldNotOpen(resolved, cause).message : cause.message;
    throw new Qcow2Error(cause.code, `Could not open new backing file '${options.backingFile}': ${reason}`, { cause });
  }
}

/** The extent holding `offset` in `extents` (sorted, gapless), found by bisection. */
function extentAt(extents: readonly Extent[], offset: number): number {
  let lo = 0;
  let hi = extents.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (extents[mid].offset <= offset) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/** From `offset`, up to `max` bytes over which `test` stays what it is at `offset`: the value and the length. */
function runOf(extents: readonly Extent[], offset: number, max: number, test: (e: Extent) => boolean): { value: boolean; length: number } {
  let i = extentAt(extents, offset);
  const value = test(extents[i]);
  let end = extents[i].offset + extents[i].length;
  while (end < offset + max && i + 1 < extents.length && test(extents[i + 1]) === value) {
    i++;
    end = extents[i].offset + extents[i].length;
  }
  return { value, length: Math.min(end, offset + max) - offset };
}

/** The image itself allocates the run (data or zeros of its own). */
function ownedByTop(e: Extent): boolean {
  return e.depth === 0 && e.kind !== 'unallocated';
}

/**
 * The run's content comes from an image above depth `depth` of the chain: allocated there, or
 * zeros past the end of a short image above it (reported at the depth of the image just above that one).
 */
export function suppliedAbove(e: Extent, depth: number): boolean {
  return e.kind === 'unallocated' ? e.depth + 1 < depth : e.depth < depth;
}

/**
 * Where two buffers agree or differ, in runs of `unit`-byte pieces aligned to guest offsets
 * (`base` is the guest offset of byte 0): the first run's kind and length, clipped to `to`.
 */
function unitRun(a: Buffer, b: Buffer, base: number, from: number, to: number, unit: number): { differs: boolean; length: number } {
  const pieceEnd = (at: number) => Math.min(to, at + unit - ((base + at) % unit));
  const differ = (at: number) => {
    const end = pieceEnd(at);
    return a.compare(b, at, end, at, end) !== 0;
  };
  const differs = differ(from);
  let at = pieceEnd(from);
  while (at < to && differ(at) === differs) at = pieceEnd(at);
  return { differs, length: at - from };
}

/**
 * Write into the image every piece of [offset, offset + n) where `old` and `fresh` differ, from
 * `old`. qemu-img writes differing 512-byte sectors; comparing whole allocation units (the image's
 * cluster or subcluster) instead gives the same image: a unit with one differing sector is
 * allocated by qemu's write too, and its other sectors get the old content by copy-on-write from
 * the old backing file, which is what is written here. Zeros past the old backing file's end are
 * written sector by sector, as qemu writes them (a zero write's result depends on its extent).
 */
async function writeDifferences(image: Image, old: Buffer, fresh: Buffer, offset: number, n: number, oldIsZero: boolean): Promise<void> {
  const unit = oldIsZero ? SECTOR : allocationUnit(image);
  for (let at = 0; at < n; ) {
    // Sectors count from the start of the unit of work, as in qemu; allocation units from guest offset 0.
    const { differs, length } = unitRun(old, fresh, oldIsZero ? 0 : offset, at, n, unit);
    if (differs) {
      if (oldIsZero) await image.writeZeroes(offset + at, length);
      else await image.write(old.subarray(at, at + length), offset + at);
    }
    at += length;
  }
}

/** The least the image allocates at once: its subcluster (extended L2) or cluster. */
function allocationUnit(image: Image): number {
  if (!(image instanceof Qcow2Image)) return SECTOR;
  return image.header.extendedL2 ? image.clusterSize / 32 : image.clusterSize;
}

/** One unit of safe mode's work: a stretch to compare, and which side reads as zeros without a read. */
interface Chunk {
  offset: number;
  length: number;
  oldIsZero: boolean;
  newIsZero: boolean;
}

/**
 * The units of work in qemu-img rebase's steps: from each offset, the run (at most 2 MiB) over
 * which the image's own allocation stays the same; runs the image allocates are skipped, as are
 * runs the new backing file supplies itself when it is part of the old chain; a run is also cut
 * where the old or the new backing file ends.
 */
function* chunksToCompare(extents: readonly Extent[], size: number, oldSize: number, target: NewBacking): Generator<Chunk> {
  for (let offset = 0, n = 0; offset < size; offset += n) {
    const own = runOf(extents, offset, Math.min(REBASE_CHUNK, size - offset), ownedByTop);
    n = own.length;
    if (own.value) continue;
    if (target.chainDepth > 0) {
      const above = runOf(extents, offset, n, (e) => suppliedAbove(e, target.chainDepth));
      n = above.length;
      if (!above.value) continue;
    }
    const oldIsZero = offset >= oldSize;
    if (!oldIsZero) n = Math.min(n, oldSize - offset);
    const newIsZero = target.image === undefined || offset >= target.size;
    if (!newIsZero) n = Math.min(n, target.size - offset);
    yield { offset, length: n, oldIsZero, newIsZero };
  }
}

/** Units of work in flight at once: each reads both sides, then writes what differs. */
const REBASE_PARALLEL = 4;

/** Safe mode's copy: every unit compared and its differences written, REBASE_PARALLEL at a time. */
async function copyDifferences(image: Image, target: NewBacking, options: RebaseOptions): Promise<void> {
  const extents: Extent[] = [];
  for await (const e of image.extents()) extents.push(e);
  const size = image.size;
  const oldSize = image instanceof Qcow2Image && image.backing ? image.backing.size : 0;
  const total = size === 0 ? 1 : Math.max(1, Math.floor(size / Math.min(size, REBASE_CHUNK)));
  const chunks = chunksToCompare(extents, size, oldSize, target);
  let done = 0;
  let failed = false;
  const worker = async (): Promise<void> => {
    const old = allocAligned(REBASE_CHUNK);
    const fresh = allocAligned(REBASE_CHUNK);
    for (let next = chunks.next(); !next.done && !failed; next = chunks.next()) {
      options.signal?.throwIfAborted();
      const { offset, length, oldIsZero, newIsZero } = next.value;
      const reads: Promise<void>[] = [];
      if (oldIsZero) old.fill(0, 0, length);
      else reads.push(image.read(old.subarray(0, length), offset));
      if (newIsZero) fresh.fill(0, 0, length);
      else reads.push(target.image!.read(fresh.subarray(0, length), offset));
      await Promise.all(reads);
      await writeDifferences(image, old, fresh, offset, length, oldIsZero);
      options.onProgress?.(++done, total);
    }
  };
  const guarded = () =>
    worker().catch((error: unknown) => {
      failed = true;
      throw error;
    });
  await Promise.all(Array.from({ length: REBASE_PARALLEL }, guarded));
  await image.flush();
}
