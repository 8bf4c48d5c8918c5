/**
 * Changing the options of an existing qcow2 image (library side of `qcow2 amend`), as qemu-img
 * amend does: compat (0.10 ⇄ 1.1), lazy_refcounts, size, data_file and data_file_raw; the
 * backing file only as it already is (qemu 7.2 sends other changes to rebase). Changing
 * refcount_bits is refused (UNSUPPORTED), as are downgrades this package cannot do safely.
 */
import { ErrorCodes, Qcow2Error, check } from '../errors.js';
import type { Extent, ImageFormat } from '../image.js';
import { CacheMode, allocAligned } from '../native.js';
import { FEATURE_NAMES, V3_HEADER_LENGTH } from '../qcow2/create.js';
import { Qcow2Header, V2_HEADER_LENGTH } from '../qcow2/header.js';
import { rewriteHeader } from '../qcow2/header-update.js';
import { Qcow2Image } from '../qcow2/image.js';
import { openMetadataFile } from '../qcow2/metadata-file.js';
import { readSnapshots } from '../qcow2/snapshots.js';
import { openChainImage } from './chain-open.js';

/** What qemu-img amend -o can change on a qcow2 image. */
export interface AmendChanges {
  /** '0.10' (version 2) or '1.1' (version 3); qemu's 'v2' and 'v3' are accepted too. */
  compat?: '0.10' | '1.1' | 'v2' | 'v3';
  lazyRefcounts?: boolean;
  /** New virtual size in bytes (growing or shrinking). */
  size?: number;
  /** Must equal the current backing file name (qemu 7.2: other changes are rebase's job). */
  backingFile?: string;
  /** Must equal the current backing format. */
  backingFormat?: string;
  /** New name of the external data file (images that have one). */
  dataFile?: string;
  /** Only `false` (or `true` when already set): qemu does not make an existing data file raw. */
  dataFileRaw?: boolean;
  /** Width of a refcount entry; only the current width is accepted here. */
  refcountBits?: number;
  /** Any encryption option: refused, as no image opened here is encrypted. */
  encryption?: boolean;
}

/** amend()'s options: the changes, plus how the image is opened. */
export interface AmendOptions extends AmendChanges {
  /** The image's format (probed when left out). */
  format?: ImageFormat;
  /** Host cache of the image (qemu-img -t; default 'writeback'). */
  cache?: CacheMode;
  /** Follow the data file name the image records (default false; the CLI sets it). */
  followFileNames?: boolean;
}

/** What amend() will do, worked out from the header before anything is written. */
interface AmendPlan {
  version: 2 | 3;
  lazyRefcounts: boolean;
  size?: number;
  dataFile?: string;
  dataFileRaw: boolean;
}

function invalid(message: string): Qcow2Error {
  return new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, message);
}

function unsupported(message: string): Qcow2Error {
  return new Qcow2Error(ErrorCodes.UNSUPPORTED, message);
}

/** The version a compat value names, or qemu's error. */
function versionOf(compat: string | undefined, current: 2 | 3): 2 | 3 {
  if (compat === undefined) return current;
  if (compat === '0.10' || compat === 'v2') return 2;
  if (compat === '1.1' || compat === 'v3') return 3;
  throw invalid(`Unknown compatibility level ${compat}`);
}

/** Check every change against the header, in qemu's order and words; nothing is written yet. */
function plan(h: Qcow2Header, o: AmendChanges): AmendPlan {
  const version = versionOf(o.compat, h.version);
  if (o.size !== undefined) check(Number.isSafeInteger(o.size) && o.size > 0, `amend: size must be a positive integer, got ${o.size}`);
  if (o.dataFile !== undefined && !h.externalDataFile) throw invalid('data-file can only be set for images that use an external data file');
  if (o.dataFileRaw && !h.dataFileRaw) throw invalid('data-file-raw cannot be set on existing images');
  if (o.refcountBits !== undefined) checkRefcountBits(o.refcountBits, h, version);
  if (o.encryption) throw invalid("Can't amend encryption options - encryption not present");
  if (o.backingFile !== undefined || o.backingFormat !== undefined) {
    if (o.backingFile !== h.backingFile || o.backingFormat !== h.backingFormat) {
      throw invalid("Cannot amend the backing file\nYou can use 'qcow2 rebase' instead.");
    }
  }
  const lazyRefcounts = o.lazyRefcounts ?? h.lazyRefcounts;
  if (lazyRefcounts && !h.lazyRefcounts && version < 3) {
    throw invalid('Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  }
  if (version < h.version) checkDowngrade(h);
  return { version, lazyRefcounts: version === 3 && lazyRefcounts, size: o.size, dataFile: o.dataFile, dataFileRaw: o.dataFileRaw ?? h.dataFileRaw };
}

/** Refcount widths: powers of two up to 64, 16 only for version 2, and (here) only the current one. */
function checkRefcountBits(bits: number, h: Qcow2Header, version: 2 | 3): void {
  if (!(Number.isSafeInteger(bits) && bits > 0 && bits <= 64 && (bits & (bits - 1)) === 0)) {
    throw invalid('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version < 3 && bits !== 16) {
    throw invalid('Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  const current = 2 ** h.refcountOrder;
  if (bits !== current) throw unsupported(`refcount_bits: changing the refcount width (${current} to ${bits} bits) is not supported`);
}

/** What version 2 cannot hold, refused before anything changes (qemu's words where qemu refuses too). */
function checkDowngrade(h: Qcow2Header): void {
  if (h.refcountOrder !== 4) throw invalid('compat=0.10 requires refcount_bits=16');
  if (h.externalDataFile) throw unsupported('Cannot downgrade an image with a data file');
  // qemu 7.2 drops a zstd compression type silently, which makes compressed clusters unreadable: refused here.
  const blocking = h.incompatibleFeatures & ~1n;
  if (blocking !== 0n) throw unsupported(`Cannot downgrade an image with incompatible features 0x${blocking.toString(16)} set`);
  if (h.nbSnapshots > 0) throw unsupported('compat: downgrading an image with internal snapshots is not supported (their zero clusters would need rewriting)');
  if (h.bitmaps) throw unsupported('compat: downgrading an image with persistent bitmaps is not supported (version 2 cannot keep them)');
}

/** Version 3 needs at least 16 bytes of extra data per snapshot, which qemu adds by rewriting the table: refused here. */
async function checkUpgrade(path: string, h: Qcow2Header): Promise<void> {
  if (h.nbSnapshots === 0) return;
  const file = await openMetadataFile(path);
  try {
    const table = await readSnapshots(file, h, false);
    if (table.entries.some((e) => e.extraData.length < 16)) {
      throw unsupported('compat: upgrading an image whose snapshots lack version 3 extra data is not supported');
    }
  } finally {
    await file.handle.close();
  }
}

/**
 * Version 2 has no zero flag. As qemu does it: a zero cluster with no space of its own becomes
 * unallocated where no backing file shows through it; one with space (or under a backing file)
 * gets explicit zeros. Everything else the image maps is left as it is.
 */
async function expandZeroClusters(image: Qcow2Image): Promise<void> {
  const zeros: Extent[] = [];
  for await (const e of image.extents()) if (e.depth === 0 && e.kind === 'zero') zeros.push(e);
  const chunk = 2 << 20;
  const buffer = allocAligned(chunk);
  for (const z of zeros) {
    if (image.header.backingFile === undefined && z.hostOffset === undefined) {
      // Opened without a backing image, a discard unmaps a zero cluster that holds no space.
      await image.discard(z.offset, z.length);
      continue;
    }
    for (let at = 0; at < z.length; at += chunk) await image.write(buffer.subarray(0, Math.min(chunk, z.length - at)), z.offset + at);
  }
}

/** The header after the amendment. */
function amended(h: Qcow2Header, p: AmendPlan): Qcow2Header {
  const out: Qcow2Header = { ...h, lazyRefcounts: p.lazyRefcounts, dataFileRaw: p.dataFileRaw };
  if (p.dataFile !== undefined) out.dataFile = p.dataFile;
  if (p.version === h.version) return out;
  if (p.version === 3) {
    return { ...out, version: 3, headerLength: V3_HEADER_LENGTH, featureNames: [...FEATURE_NAMES], unknownHeaderFields: Buffer.alloc(V3_HEADER_LENGTH - 105) };
  }
  return {
    ...out,
    version: 2,
    headerLength: V2_HEADER_LENGTH,
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    lazyRefcounts: false,
    dataFileRaw: false,
    bitmapsAutoclear: false,
    featureNames: [],
    unknownHeaderFields: Buffer.alloc(0),
  };
}

/**
 * Amend the qcow2 image at `path` like qemu-img amend -o. The image is opened writable without
 * its backing chain (which cleans a dirty image), resized and its zero clusters expanded when
 * asked, closed, and its header rewritten once through ts/qcow2/header-update.ts.
 */
export async function amend(path: string, options: AmendOptions): Promise<void> {
  const opening = { format: options.format, cache: options.cache, followFileNames: options.followFileNames, backing: false };
  const image = await openChainImage(path, { ...opening, readOnly: true });
  let header: Qcow2Header;
  let steps: AmendPlan;
  try {
    if (!(image instanceof Qcow2Image)) throw unsupported(`Format driver '${image.format}' does not support option amendment`);
    header = image.header;
    steps = plan(header, options);
  } finally {
    await image.close();
  }
  if (steps.version > header.version) await checkUpgrade(path, header);
  const resize = steps.size !== undefined && steps.size !== header.size;
  if (resize || steps.version < header.version || header.dirty) {
    // Only these need the engine; a header-only change never opens the image for writing.
    const writable = (await openChainImage(path, { ...opening, format: 'qcow2', readOnly: false })) as Qcow2Image;
    try {
      if (resize) await writable.resize(steps.size!, { shrink: true });
      if (steps.version < header.version) await expandZeroClusters(writable);
      await writable.flush();
    } finally {
      await writable.close();
    }
  }
  const decided = steps;
  await rewriteHeader(path, (h) => amended(h, decided));
}
