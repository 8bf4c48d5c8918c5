/**
 * Persistent dirty bitmaps during a writable open, as QEMU keeps them: every consistent bitmap is
 * marked in_use on disk at open (a crash leaves it inconsistent), the engine records each change of
 * the disk in the `auto` ones, and a clean close writes them back and clears in_use again.
 */
import { settle } from '../errors.js';
import type { NativeFile, Qcow2Engine, Qcow2EngineBitmap } from '../native.js';
import { BitmapEntry, BitmapFlag, encodeBitmapDirectory, readBitmaps, withInUse } from './bitmaps.js';
import type { Qcow2Header } from './header.js';
import { openMetadataFile } from './metadata-file.js';

/** The bitmaps of an image open for writing, and where their directory lies. */
export class BitmapTracking {
  readonly #entries: BitmapEntry[];
  readonly #directoryOffset: number;
  /** Indices in #entries of the bitmaps the engine loaded (consistent at open), in the engine's order. */
  readonly #loaded: number[];
  /** Names of the bitmaps that were in use (inconsistent) at open: they stay so. */
  readonly inconsistent: string[];

  private constructor(entries: BitmapEntry[], directoryOffset: number) {
    this.#entries = entries;
    this.#directoryOffset = directoryOffset;
    this.#loaded = entries.flatMap((e, i) => (usable(e) ? [i] : []));
    this.inconsistent = entries.filter((e) => e.inUse).map((e) => e.name);
  }

  /**
   * The bitmaps of the image when they are consistent (version 3, the autoclear bit set, the
   * directory decoding); undefined otherwise, and the open then clears the autoclear bit as before.
   */
  static async load(imagePath: string, header: Qcow2Header): Promise<BitmapTracking | undefined> {
    if (header.version < 3 || !header.bitmapsAutoclear || !header.bitmaps) return undefined;
    const metadata = await openMetadataFile(imagePath);
    try {
      return new BitmapTracking(await readBitmaps(metadata, header), header.bitmaps.bitmapDirectoryOffset);
    } catch {
      return undefined;
    } finally {
      await metadata.handle.close();
    }
  }

  /** What the engine loads: the consistent bitmaps; only the `auto` ones record writes. */
  engineBitmaps(): Qcow2EngineBitmap[] {
    return this.#loaded.map((i) => {
      const e = this.#entries[i];
      return { tableOffset: e.bitmapTableOffset, tableEntries: e.bitmapTableSize, granularityBits: e.granularityBits, enabled: e.auto };
    });
  }

  /** Mark the loaded bitmaps in use on disk, before anything is written. */
  async markInUse(file: NativeFile): Promise<void> {
    if (this.#loaded.length === 0) return;
    for (const i of this.#loaded) this.#entries[i] = withInUse(this.#entries[i], true);
    await this.#writeDirectory(file);
  }

  /** Have the engine write the bitmaps back, name their tables in the directory with in_use cleared, then free what they left. */
  async store(engine: Qcow2Engine, file: NativeFile): Promise<void> {
    if (this.#loaded.length === 0) return;
    const stored = await engine.storeBitmaps();
    this.#loaded.forEach((index, k) => {
      const { tableOffset, tableEntries } = stored[k];
      this.#entries[index] = { ...withInUse(this.#entries[index], false), bitmapTableOffset: tableOffset, bitmapTableSize: tableEntries };
    });
    await this.#writeDirectory(file);
    await engine.releaseBitmapClusters();
  }

  async #writeDirectory(file: NativeFile): Promise<void> {
    // Only flags and table places change: the directory keeps its size and is rewritten where it is.
    await settle(file.write(encodeBitmapDirectory(this.#entries), this.#directoryOffset));
    await settle(file.flush());
  }
}

/** A bitmap QEMU loads: consistent, its extra data (if any) declared compatible. */
function usable(e: BitmapEntry): boolean {
  return !e.inUse && (e.extraData.length === 0 || (e.flags & BitmapFlag.EXTRA_DATA_COMPATIBLE) !== 0);
}
