/** qemu-img bitmap as a library: add, remove, clear, enable, disable and merge persistent dirty bitmaps. */
import { ErrorCodes, Qcow2Error, asQcow2Error } from '../errors.js';
import type { Image, ImageFormat } from '../image.js';
import type { CacheMode } from '../native.js';
import { open } from '../open.js';
import { BitmapTracking, checkGranularity } from '../qcow2/bitmap-tracking.js';
import { readBitmaps } from '../qcow2/bitmaps.js';
import { Qcow2Image } from '../qcow2/image.js';
import { openMetadataFile } from '../qcow2/metadata-file.js';
import { rawProbeWarning } from './io/probe-guard.js';

/** One action on a bitmap; `merge` sets the bits of bitmap `source` (of options.sourceFile, or of the image itself). */
export type BitmapAction =
  | { kind: 'add' | 'remove' | 'clear' | 'enable' | 'disable' }
  | { kind: 'merge'; source: string };

/** Options of bitmap(). */
export interface BitmapOptions {
  /** Bytes each bit of an added bitmap covers: a power of two from 512 to 2 GiB (default: the cluster size, within 4 KiB..64 KiB). */
  granularity?: number;
  /** The image whose bitmaps `merge` reads (default: the image itself). */
  sourceFile?: string;
  sourceFormat?: ImageFormat;
  /** The image's format (default: probed). */
  format?: ImageFormat;
  /** Host cache mode (default 'writeback', as qemu-img). */
  cache?: CacheMode;
  /** Called with the warnings qemu-img prints on stderr (a format probed as raw). */
  onWarning?: (text: string) => void;
}

/** qemu's default granularity: the cluster size, bounded to 4 KiB..64 KiB. */
export function defaultGranularity(clusterSize: number): number {
  return Math.min(65536, Math.max(4096, clusterSize));
}

/**
 * Apply `actions` in order to bitmap `name` of the image at `path`, as qemu-img bitmap does. A failing
 * action throws "Operation KIND on bitmap NAME failed: REASON"; the actions before it stay applied.
 */
export async function bitmap(path: string, name: string, actions: readonly BitmapAction[], options: BitmapOptions = {}): Promise<void> {
  checkOptions(actions, options);
  const image = await openTarget(path, options);
  if (options.format === undefined && image.format === 'raw') options.onWarning?.(rawProbeWarning(path));
  try {
    for (const action of actions) {
      try {
        await apply(image, name, action, options);
      } catch (error) {
        const cause = asQcow2Error(error);
        throw new Qcow2Error(cause.code, `Operation ${action.kind} on bitmap ${name} failed: ${cause.message}`, { cause });
      }
    }
  } finally {
    await image.close();
  }
}

/** The image opened for writing; a failure reads "Could not open 'PATH': REASON" as qemu-img's does. */
async function openTarget(path: string, options: BitmapOptions): Promise<Image> {
  try {
    // A file that cannot be opened is named as qemu-img names it ("Could not open 'PATH': No such file or directory").
    await (await openMetadataFile(path)).handle.close();
    return await open(path, { format: options.format, cache: options.cache ?? 'writeback', followFileNames: true });
  } catch (error) {
    const cause = asQcow2Error(error);
    throw new Qcow2Error(cause.code, `Could not open '${path}': ${cause.message}`, { cause });
  }
}

function checkOptions(actions: readonly BitmapAction[], options: BitmapOptions): void {
  const invalid = (message: string) => new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, message);
  if (actions.length === 0) throw invalid('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  if (options.granularity !== undefined && !actions.some((a) => a.kind === 'add')) throw invalid('granularity only supported with --add');
  if (options.sourceFormat !== undefined && options.sourceFile === undefined) throw invalid('-F only supported with -b');
  if (options.sourceFile !== undefined && !actions.some((a) => a.kind === 'merge')) {
    throw invalid('Merge bitmap source file only supported with --merge');
  }
}

/** The bitmaps of a writable qcow2 image; other images cannot hold persistent bitmaps. */
function bitmapsOf(image: Image, name: string, action: BitmapAction, options: BitmapOptions): BitmapTracking {
  const tracking = image instanceof Qcow2Image ? image.persistentBitmaps : undefined;
  if (tracking) return tracking;
  if (action.kind === 'add') {
    // qemu checks the granularity before it asks the format to store the bitmap.
    if (options.granularity !== undefined) checkGranularity(options.granularity);
    if (image instanceof Qcow2Image && image.header.version < 3) {
      throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `Can't make bitmap '${name}' persistent in '${image.path}': Cannot store dirty bitmaps in qcow2 v2 files`);
    }
    throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `Can't store persistent bitmaps to '${image.path}': Operation not supported`);
  }
  throw new Qcow2Error('ENOENT', `Dirty bitmap '${name}' not found`);
}

async function apply(image: Image, name: string, action: BitmapAction, options: BitmapOptions): Promise<void> {
  const tracking = bitmapsOf(image, name, action, options);
  const engine = (image as Qcow2Image).engine;
  switch (action.kind) {
    case 'add':
      return tracking.add(engine, name, options.granularity ?? defaultGranularity((image as Qcow2Image).clusterSize), image.path);
    case 'remove':
      return tracking.remove(engine, name);
    case 'clear':
      return tracking.clear(engine, name);
    case 'enable':
    case 'disable':
      return tracking.setEnabled(engine, name, action.kind === 'enable');
    case 'merge': {
      // The target is checked first, as qemu names a missing target before a missing source.
      await tracking.bits(engine, name);
      const source = options.sourceFile === undefined ? await tracking.bits(engine, action.source) : await bitsOfFile(image, action.source, options);
      return tracking.merge(engine, name, source);
    }
  }
}

/** The bits of bitmap `source` of options.sourceFile, opened read-only. */
async function bitsOfFile(target: Image, source: string, options: BitmapOptions): Promise<{ bits: Buffer; granularityBits: number }> {
  const file = options.sourceFile!;
  const image = await open(file, { format: options.sourceFormat, readOnly: true, cache: options.cache ?? 'writeback', followFileNames: true });
  try {
    const notFound = new Qcow2Error('ENOENT', `Dirty bitmap '${source}' not found`);
    if (!(image instanceof Qcow2Image) || !image.header.bitmapsAutoclear) throw notFound;
    const metadata = await openMetadataFile(file);
    const entry = await readBitmaps(metadata, image.header)
      .then((entries) => entries.find((e) => e.name === source))
      .finally(() => metadata.handle.close());
    if (!entry) throw notFound;
    if (entry.inUse) {
      throw new Qcow2Error(
        ErrorCodes.INVALID_ARGUMENT,
        `Bitmap '${source}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk`,
      );
    }
    if (image.size !== target.size) {
      throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `Bitmaps are incompatible and can't be merged`);
    }
    const bits = await image.engine.readBitmap({
      tableOffset: entry.bitmapTableOffset,
      tableEntries: entry.bitmapTableSize,
      granularityBits: entry.granularityBits,
    });
    return { bits, granularityBits: entry.granularityBits };
  } finally {
    await image.close();
  }
}
