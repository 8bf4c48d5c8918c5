/**
 * Opening images for the commands that change a chain (rebase, commit, amend), with qemu-img's
 * wording when it fails: "Could not open 'IMAGE': Could not open 'IMAGE': No such file or
 * directory", "Could not open 'TOP': Could not open backing file: Could not open 'BASE': …".
 */
import { stat } from 'node:fs/promises';

import { Qcow2Error, asQcow2Error } from '../errors.js';
import type { Image, ImageFormat } from '../image.js';
import type { CacheMode } from '../native.js';
import { open } from '../open.js';
import { Qcow2Image } from '../qcow2/image.js';
import { errnoText } from '../qcow2/metadata-file.js';
import { readHeader } from '../qcow2/header.js';
import { cString, combineFileName } from '../qcow2/text.js';

/** How a chain command opens its image. */
export interface ChainOpenOptions {
  format?: ImageFormat;
  readOnly: boolean;
  /** Open the backing chain (default true). */
  backing?: boolean;
  cache?: CacheMode;
  backingCache?: CacheMode;
  followFileNames?: boolean;
}

/** True for an errno name (ENOENT, EACCES, …) rather than one of this package's codes. */
export function isErrno(code: string): boolean {
  return /^E[A-Z0-9]+$/.test(code);
}

/** "Could not open 'PATH': REASON", with strerror's words for system errors. */
export function couldNotOpen(path: string, error: unknown): Qcow2Error {
  const cause = asQcow2Error(error);
  const reason = isErrno(cause.code) ? errnoText(cause).text : cause.message;
  return new Qcow2Error(cause.code, `Could not open '${path}': ${reason}`, { cause });
}

/** The failure of the first backing file of `path` that cannot be reached, when that is why the open failed. */
async function backingFailure(path: string): Promise<Qcow2Error | undefined> {
  let name: string | undefined;
  try {
    name = (await readHeader(path)).header.backingFile;
  } catch {
    return undefined;
  }
  if (name === undefined) return undefined;
  const backing = combineFileName(path, cString(name));
  try {
    await stat(backing);
    return undefined;
  } catch (error) {
    return couldNotOpen(backing, error);
  }
}

/** Open `path` as qemu-img opens the image of a chain command; failures carry qemu-img's whole message. */
export async function openChainImage(path: string, options: ChainOpenOptions): Promise<Image> {
  try {
    await stat(path);
  } catch (error) {
    const inner = couldNotOpen(path, error);
    throw new Qcow2Error(inner.code, `Could not open '${path}': ${inner.message}`, { cause: error });
  }
  try {
    return await open(path, {
      format: options.format,
      readOnly: options.readOnly,
      backing: options.backing ?? true,
      cache: options.cache ?? 'writeback',
      backingCache: options.backingCache,
      followFileNames: options.followFileNames ?? false,
    });
  } catch (error) {
    const backing = options.backing === false ? undefined : await backingFailure(path);
    const cause = backing ? new Qcow2Error(backing.code, `Could not open backing file: ${backing.message}`) : asQcow2Error(error);
    const inner = isErrno(cause.code) && !backing ? couldNotOpen(path, cause).message : cause.message;
    throw new Qcow2Error(cause.code, `Could not open '${path}': ${inner}`, { cause: error });
  }
}

/** The images of `image`'s chain, top first (the image itself at depth 0). */
export function chainOf(image: Image): Image[] {
  const chain: Image[] = [];
  for (let at: Image | undefined = image; at; at = at instanceof Qcow2Image ? at.backing : undefined) chain.push(at);
  return chain;
}

/** Device and inode of `path`, to tell whether two names reach one file. */
export async function fileIdentity(path: string): Promise<string | undefined> {
  try {
    const s = await stat(path);
    return `${s.dev}:${s.ino}`;
  } catch {
    return undefined;
  }
}

/**
 * An image left dirty (lazy refcounts, no clean close) is opened writable once, which counts its
 * refcounts again and clears the dirty bit, so that its header may be rewritten. A clean image is
 * not opened for writing: a header-only change needs no engine.
 */
export async function cleanIfDirty(path: string, options: Omit<ChainOpenOptions, 'readOnly' | 'backing'>): Promise<void> {
  if (!(await readHeader(path)).header.dirty) return;
  const image = await openChainImage(path, { ...options, readOnly: false, backing: false });
  await image.close();
}
