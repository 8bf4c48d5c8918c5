/** Resizing images (library side of `qcow2 resize`): raw and qcow2, growing or, when asked, shrinking. */
import { ErrorCodes, Qcow2Error, asQcow2Error, check } from '../errors.js';
import type { Image, ImageFormat } from '../image.js';
import { open } from '../open.js';
import { Qcow2Image } from '../qcow2/image.js';
import { errnoText } from '../qcow2/metadata-file.js';
import { RawImage } from '../raw.js';
import { Preallocation, growRaw } from './create.js';

const PREALLOCATIONS: readonly string[] = ['off', 'metadata', 'falloc', 'full'];

/** How resize changes the size. */
export interface ResizeOptions {
  /** Allow a smaller size (qemu-img --shrink): the data past the new end is lost. */
  shrink?: boolean;
  /** How the added space is reserved (default 'off'); only for growing. */
  preallocation?: Preallocation;
}

/** resize()'s options: the change, plus how the image is opened. */
export interface ResizeFileOptions extends ResizeOptions {
  /** The image format (probed when left out). */
  format?: ImageFormat;
  /** Follow the data file name a qcow2 image records (default false; the CLI sets it). */
  followFileNames?: boolean;
}

/** A new size relative to the current one (`+1G`, `-512M` on the command line). */
export interface SizeChange {
  delta: number;
}

/** The size an image of `current` bytes gets from `size`: absolute, or relative to it. */
export function newSizeOf(current: number, size: number | SizeChange): number {
  const target = typeof size === 'number' ? size : current + size.delta;
  if (!(Number.isSafeInteger(target) && target > 0)) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, 'New image size must be positive');
  }
  return target;
}

/**
 * Give the open, writable `image` the virtual size `size` (bytes, or a change), with qemu-img
 * resize's checks in its order; resolves to the new size.
 */
export async function resizeImage(image: Image, size: number | SizeChange, options: ResizeOptions = {}): Promise<number> {
  const preallocation = options.preallocation ?? 'off';
  check(PREALLOCATIONS.includes(preallocation), `Invalid preallocation mode '${preallocation}'`);
  const current = image.size;
  const target = newSizeOf(current, size);
  if (target < current && !options.shrink) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, 'Use the --shrink option to perform a shrink operation.');
  }
  if (target <= current && preallocation !== 'off') {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, 'Preallocation can only be used for growing images');
  }
  if (image instanceof RawImage) {
    await resizeRaw(image, target, preallocation);
  } else if (image instanceof Qcow2Image) {
    if (target % 512 !== 0) throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, 'The new size must be a multiple of 512');
    await image.resize(target, { shrink: options.shrink ?? false, preallocation });
  } else {
    throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `resize: images of format '${image.format}' cannot be resized`);
  }
  await image.flush();
  return target;
}

async function resizeRaw(image: RawImage, target: number, preallocation: Preallocation): Promise<void> {
  if (preallocation === 'metadata') throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, 'Unsupported preallocation mode: metadata');
  if (target > image.size && preallocation !== 'off') await growRaw(image.file, image.size, target, preallocation);
  await image.resize(target);
}

/** Open the image at `path` for writing, resize it like `qemu-img resize`, and close it; resolves to the new size. */
export async function resize(path: string, size: number | SizeChange, options: ResizeFileOptions = {}): Promise<number> {
  const image = await openForResize(path, options);
  try {
    return await resizeImage(image, size, options);
  } finally {
    await image.close();
  }
}

/**
 * Open `path` writable without its backing chain (resizing never reads it); a failure reads
 * "Could not open 'PATH': REASON" with strerror's wording for system errors.
 */
export async function openForResize(path: string, options: ResizeFileOptions = {}): Promise<Image> {
  try {
    return await open(path, {
      format: options.format,
      readOnly: false,
      backing: false,
      followFileNames: options.followFileNames ?? false,
      cache: 'writeback',
    });
  } catch (error) {
    const cause = asQcow2Error(error);
    const reason = /^E[A-Z0-9]+$/.test(cause.code) ? errnoText(cause).text : cause.message;
    throw new Qcow2Error(cause.code, `Could not open '${path}': ${reason}`, { cause });
  }
}
