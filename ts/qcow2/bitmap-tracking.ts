/**
 * Persistent dirty bitmaps during a writable open, as QEMU keeps them: every consistent bitmap is
 * marked in_use on disk at open (a crash leaves it inconsistent), the engine records each change of
 * the disk in the `auto` ones, and a clean close writes them back and clears in_use again. Bitmaps
 * can be added, removed, cleared, enabled, disabled and merged meanwhile (qcow2 bitmap).
 */
import { ErrorCodes, Qcow2Error, settle } from '../errors.js';
import type { NativeFile, Qcow2Engine, Qcow2EngineBitmap } from '../native.js';
import {
  BITMAP_TYPE_DIRTY_TRACKING,
  BitmapEntry,
  BitmapFlag,
  MAX_BITMAP_NAME,
  MAX_GRANULARITY_BITS,
  MIN_GRANULARITY_BITS,
  encodeBitmapDirectory,
  readBitmaps,
  withInUse,
} from './bitmaps.js';
import { Qcow2Header, readHeader } from './header.js';
import { headerCluster } from './header-update.js';
import { openMetadataFile } from './metadata-file.js';
import { encodeName } from './text.js';

/** A bitmap of the directory, and its index in the engine when the engine holds it (not in use). */
interface Tracked {
  entry: BitmapEntry;
  engineIndex: number | undefined;
}

/** The bitmaps of an image open for writing, and where their directory lies. */
export class BitmapTracking {
  #bitmaps: Tracked[];
  #directoryOffset: number;
  #directoryBytes: number;
  /** Bitmaps were added or removed: the directory is written anew and the header names it. */
  #reshaped = false;
  /** Names of the bitmaps that were in use (inconsistent) at open: they stay so. */
  readonly inconsistent: string[];

  private constructor(entries: BitmapEntry[], directoryOffset: number, directoryBytes: number) {
    let loaded = 0;
    this.#bitmaps = entries.map((entry) => ({ entry, engineIndex: usable(entry) ? loaded++ : undefined }));
    this.#directoryOffset = directoryOffset;
    this.#directoryBytes = directoryBytes;
    this.inconsistent = entries.filter((e) => e.inUse).map((e) => e.name);
  }

  /**
   * The bitmaps of a version 3 image whose bitmaps are consistent (none, or the autoclear bit set and
   * the directory decoding); undefined otherwise, and the open then clears the autoclear bit as before.
   */
  static async load(imagePath: string, header: Qcow2Header): Promise<BitmapTracking | undefined> {
    if (header.version < 3) return undefined;
    if (!header.bitmaps) return new BitmapTracking([], 0, 0);
    if (!header.bitmapsAutoclear) return undefined;
    const metadata = await openMetadataFile(imagePath);
    try {
      return new BitmapTracking(await readBitmaps(metadata, header), header.bitmaps.bitmapDirectoryOffset, header.bitmaps.bitmapDirectorySize);
    } catch {
      return undefined;
    } finally {
      await metadata.handle.close();
    }
  }

  /** What the engine loads: the consistent bitmaps; only the `auto` ones record writes. */
  engineBitmaps(): Qcow2EngineBitmap[] {
    return this.#bitmaps
      .filter((b) => b.engineIndex !== undefined)
      .map(({ entry: e }) => ({ tableOffset: e.bitmapTableOffset, tableEntries: e.bitmapTableSize, granularityBits: e.granularityBits, enabled: e.auto }));
  }

  /** The directory entries as they stand (flags as they will be stored, in_use aside). */
  get entries(): BitmapEntry[] {
    return this.#bitmaps.map((b) => b.entry);
  }

  /** Mark the loaded bitmaps in use on disk, before anything is written. */
  async markInUse(file: NativeFile): Promise<void> {
    if (!this.#bitmaps.some((b) => b.engineIndex !== undefined)) return;
    for (const b of this.#bitmaps) if (b.engineIndex !== undefined) b.entry = withInUse(b.entry, true);
    await this.#writeInPlace(file);
  }

  /** Add an empty bitmap, enabled (`auto`) unless `disabled`, as qemu-img bitmap --add does. */
  async add(engine: Qcow2Engine, name: string, granularity: number, imagePath: string): Promise<void> {
    if (this.#find(name)) throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `Bitmap already exists: ${name}`);
    const bits = checkGranularity(granularity);
    if (encodeName(name).length > MAX_BITMAP_NAME) {
      throw new Qcow2Error(
        ErrorCodes.INVALID_ARGUMENT,
        `Can't make bitmap '${name}' persistent in '${imagePath}': Name length exceeds maximum (${MAX_BITMAP_NAME} characters)`,
      );
    }
    const engineIndex = await engine.addBitmap(bits, true);
    const entry: BitmapEntry = {
      name,
      bitmapTableOffset: 0,
      bitmapTableSize: 0,
      flags: BitmapFlag.AUTO,
      inUse: false,
      auto: true,
      type: BITMAP_TYPE_DIRTY_TRACKING,
      granularityBits: bits,
      granularity: granularity,
      extraData: Buffer.alloc(0),
    };
    this.#bitmaps.push({ entry, engineIndex });
    this.#reshaped = true;
  }

  /** Remove bitmap `name` (an inconsistent one too); its clusters are freed at close. */
  async remove(engine: Qcow2Engine, name: string): Promise<void> {
    const found = this.#existing(name);
    if (found.engineIndex !== undefined) await engine.changeBitmap(found.engineIndex, 'remove');
    else await engine.dropBitmapTable(found.entry.bitmapTableOffset, found.entry.bitmapTableSize);
    this.#bitmaps = this.#bitmaps.filter((b) => b !== found);
    this.#reshaped = true;
  }

  /** Clear every bit of bitmap `name`. */
  async clear(engine: Qcow2Engine, name: string): Promise<void> {
    await engine.changeBitmap(this.#usable(name).engineIndex!, 'clear');
  }

  /** Have bitmap `name` record writes (`auto`) or not. */
  async setEnabled(engine: Qcow2Engine, name: string, enabled: boolean): Promise<void> {
    const found = this.#usable(name);
    await engine.changeBitmap(found.engineIndex!, enabled ? 'enable' : 'disable');
    const flags = enabled ? found.entry.flags | BitmapFlag.AUTO : found.entry.flags & ~BitmapFlag.AUTO;
    found.entry = { ...found.entry, flags, auto: enabled };
  }

  /** The bits of bitmap `name` of this image as they are now, and its granularity in bits. */
  async bits(engine: Qcow2Engine, name: string): Promise<{ bits: Buffer; granularityBits: number }> {
    const found = this.#usable(name);
    return { bits: await engine.bitmapBits(found.engineIndex!), granularityBits: found.entry.granularityBits };
  }

  /** Set in bitmap `name` every granule the set `bits` (of a bitmap at `granularityBits`) cover. */
  async merge(engine: Qcow2Engine, name: string, source: { bits: Buffer; granularityBits: number }): Promise<void> {
    await engine.changeBitmap(this.#usable(name).engineIndex!, 'merge', source.bits, source.granularityBits);
  }

  /**
   * Have the engine write the bitmaps back, name their tables in the directory with in_use cleared
   * (a new directory, and the header pointing at it, when bitmaps were added or removed), then free
   * what the old tables and directory used.
   */
  async store(engine: Qcow2Engine, file: NativeFile, imagePath: string): Promise<void> {
    if (!this.#reshaped && !this.#bitmaps.some((b) => b.engineIndex !== undefined)) return;
    const stored = await engine.storeBitmaps();
    for (const b of this.#bitmaps) {
      if (b.engineIndex === undefined) continue;
      const { tableOffset, tableEntries } = stored[b.engineIndex];
      b.entry = { ...withInUse(b.entry, false), bitmapTableOffset: tableOffset, bitmapTableSize: tableEntries };
    }
    if (this.#reshaped) await this.#writeElsewhere(engine, file, imagePath);
    else await this.#writeInPlace(file);
    await engine.releaseBitmapClusters();
  }

  #find(name: string): Tracked | undefined {
    return this.#bitmaps.find((b) => b.entry.name === name);
  }

  #existing(name: string): Tracked {
    const found = this.#find(name);
    if (!found) throw new Qcow2Error('ENOENT', `Dirty bitmap '${name}' not found`);
    return found;
  }

  /** Bitmap `name`, which must be consistent (loaded in the engine) to be changed or read. */
  #usable(name: string): Tracked {
    const found = this.#existing(name);
    if (found.engineIndex === undefined) {
      throw new Qcow2Error(
        ErrorCodes.INVALID_ARGUMENT,
        `Bitmap '${name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk`,
      );
    }
    return found;
  }

  async #writeInPlace(file: NativeFile): Promise<void> {
    // Only flags and table places change: the directory keeps its size and is rewritten where it is.
    await settle(file.write(encodeBitmapDirectory(this.entries), this.#directoryOffset));
    await settle(file.flush());
  }

  /** Write the directory to new clusters, then the header naming it (no extension, and the autoclear bit clear, when no bitmap is left). */
  async #writeElsewhere(engine: Qcow2Engine, file: NativeFile, imagePath: string): Promise<void> {
    const directory = encodeBitmapDirectory(this.entries);
    const offset = await engine.writeBitmapDirectory(directory, this.#directoryOffset, this.#directoryBytes);
    const { header, fileSize } = await readHeader(imagePath);
    const count = this.#bitmaps.length;
    const updated: Qcow2Header = {
      ...header,
      bitmaps: count > 0 ? { nbBitmaps: count, bitmapDirectorySize: directory.length, bitmapDirectoryOffset: offset } : undefined,
      bitmapsAutoclear: count > 0,
    };
    await settle(file.write(headerCluster(updated, fileSize), 0));
    await settle(file.flush());
    this.#directoryOffset = offset;
    this.#directoryBytes = directory.length;
    this.#reshaped = false;
  }
}

/** The granularity bits of `granularity` bytes, or qemu's complaint when it is no power of two from 512 to 2 GiB. */
export function checkGranularity(granularity: number): number {
  const bits = Math.log2(granularity);
  if (!Number.isInteger(bits) || bits < MIN_GRANULARITY_BITS || bits > MAX_GRANULARITY_BITS) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, 'Granularity must be power of 2 and at least 512');
  }
  return bits;
}

/** A bitmap QEMU loads: consistent, its extra data (if any) declared compatible. */
function usable(e: BitmapEntry): boolean {
  return !e.inUse && (e.extraData.length === 0 || (e.flags & BitmapFlag.EXTRA_DATA_COMPATIBLE) !== 0);
}
