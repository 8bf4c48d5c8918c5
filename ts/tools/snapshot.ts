/**
 * Internal snapshots, as qemu-img snapshot makes them: list, create, apply and delete. The snapshot
 * table is decoded and encoded in ts/qcow2/snapshots.ts; references, COPIED flags and the order of
 * the writes are the native engine's (Qcow2Engine.changeSnapshots).
 */
import { ErrorCodes, Qcow2Error, settle } from '../errors.js';
import type { Image, ImageFormat } from '../image.js';
import type { CacheMode } from '../native.js';
import { probeFormat } from '../open.js';
import { RawImage } from '../raw.js';
import { align8 } from '../qcow2/extensions.js';
import { HEADER_FIELD_OFFSETS, MAX_SNAPSHOTS, Qcow2Header, readHeader } from '../qcow2/header.js';
import { Qcow2Image } from '../qcow2/image.js';
import { openQcow2 } from '../qcow2/open.js';
import { openMetadataFile } from '../qcow2/metadata-file.js';
import {
  MAX_SNAPSHOT_TABLE_SIZE,
  SnapshotEntry,
  SnapshotTable,
  encodeSnapshotTable,
  readSnapshots,
} from '../qcow2/snapshots.js';
import { encodeName } from '../qcow2/text.js';
import { findSnapshot } from './measure.js';

/** How the snapshot functions open the image. */
export interface SnapshotOptions {
  /** The image format; probed when left out. Only qcow2 images have internal snapshots. */
  format?: ImageFormat;
  /** Host cache mode of the image file (default 'writeback', as qemu-img snapshot uses). */
  cache?: CacheMode;
  /** Follow the backing and data file names the image records (default false in the library). */
  followFileNames?: boolean;
}

/** The largest ID or name a snapshot table entry can hold (a 16-bit length). */
const MAX_NAME_BYTES = 0xffff;

/** An image path (opened and closed here), or an image the caller opened (and keeps open). */
export type SnapshotTarget = string | Image;

/**
 * Open a path as qemu-img snapshot does: no backing chain (snapshots do not need it), the host
 * cache on, persistent bitmaps kept valid (snapshot changes write no guest data); the image is
 * writable unless `readOnly`.
 */
export async function openForSnapshots(path: string, options: SnapshotOptions, readOnly: boolean): Promise<Image> {
  const format = options.format ?? (await probeFormat(path));
  const cache = options.cache ?? 'writeback';
  if (format === 'raw') return RawImage.open(path, { readOnly, cache });
  return openQcow2(path, { format, cache, followFileNames: options.followFileNames ?? false, backing: false, readOnly, keepBitmaps: true });
}

/** Run `work` on the target as a qcow2 image (writable unless `readOnly`); raw images have no snapshots (ENOTSUP). */
async function withQcow2<T>(target: SnapshotTarget, options: SnapshotOptions, readOnly: boolean, work: (image: Qcow2Image) => Promise<T>): Promise<T> {
  const image = typeof target === 'string' ? await openForSnapshots(target, options, readOnly) : target;
  try {
    if (!(image instanceof Qcow2Image)) {
      throw new Qcow2Error('ENOTSUP', `'${image.path}' is a ${image.format} image: only qcow2 images have internal snapshots`);
    }
    if (!readOnly && image.readOnly) {
      throw new Qcow2Error(ErrorCodes.READ_ONLY, `'${image.path}' is open read-only: snapshots cannot be changed`);
    }
    return await work(image);
  } finally {
    if (typeof target === 'string') await image.close();
  }
}

/** The header as it is now (an earlier change through the same open image moved the table) and the snapshot table. */
async function readTable(image: Qcow2Image): Promise<{ header: Qcow2Header; table: SnapshotTable }> {
  const { header } = await readHeader(image.path);
  const metadata = await openMetadataFile(image.path);
  try {
    return { header, table: await readSnapshots(metadata, header) };
  } finally {
    await metadata.handle.close();
  }
}

/** The snapshots of the image, in table order; none for a raw image. */
export async function listSnapshots(target: SnapshotTarget, options: SnapshotOptions = {}): Promise<SnapshotEntry[]> {
  const image = typeof target === 'string' ? await openForSnapshots(target, options, true) : target;
  try {
    return image instanceof Qcow2Image ? (await readTable(image)).table.entries : [];
  } finally {
    if (typeof target === 'string') await image.close();
  }
}

/** The ID qemu gives a new snapshot: one more than the largest numeric ID (IDs read as C's strtoul does). */
export function nextSnapshotId(entries: readonly SnapshotEntry[]): string {
  let max = 0n;
  for (const e of entries) {
    const digits = /^\s*\+?(\d+)/.exec(e.id);
    const id = digits ? BigInt(digits[1]) : 0n;
    if (id > max) max = id;
  }
  return String(max + 1n);
}

/** The wall clock as qemu stamps a snapshot: seconds and the microseconds past them, in nanoseconds. */
function now(): { dateSec: number; dateNsec: number } {
  const micros = Math.floor((performance.timeOrigin + performance.now()) * 1000);
  return { dateSec: Math.floor(micros / 1e6), dateNsec: (micros % 1e6) * 1000 };
}

function checkName(name: string, what: string): void {
  if (typeof name !== 'string') throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `${what} must be a string, got ${typeof name}`);
  const bytes = encodeName(name).length;
  if (bytes > MAX_NAME_BYTES) {
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `${what} is ${bytes} bytes long; a snapshot name holds at most ${MAX_NAME_BYTES}`);
  }
}

/** What every change tells the engine about the table in use and the header fields. */
function tableFields(header: Qcow2Header, table: SnapshotTable) {
  return {
    oldTableOffset: header.nbSnapshots > 0 ? header.snapshotsOffset : 0,
    oldTableBytes: header.nbSnapshots > 0 ? table.byteLength : 0,
    countField: HEADER_FIELD_OFFSETS.nbSnapshots,
    offsetField: HEADER_FIELD_OFFSETS.snapshotsOffset,
  };
}

function l1sOf(entries: readonly SnapshotEntry[]): { offset: number; entries: number }[] {
  return entries.map((e) => ({ offset: e.l1TableOffset, entries: e.l1Size }));
}

/**
 * Take an internal snapshot of the image's current state named `name` (names need not be unique,
 * as in qemu-img); returns its table entry. Errors: EINVAL when a refcount would overflow its
 * width (1-bit refcounts), EFBIG past qemu's 65536 snapshots, ENOTSUP for raw images.
 */
export async function createSnapshot(target: SnapshotTarget, name: string, options: SnapshotOptions = {}): Promise<SnapshotEntry> {
  checkName(name, 'snapshot name');
  return withQcow2(target, options, false, async (image) => {
    const { header, table } = await readTable(image);
    if (table.entries.length >= MAX_SNAPSHOTS) {
      throw new Qcow2Error('EFBIG', `'${image.path}' already has ${table.entries.length} snapshots, the most qemu allows`);
    }
    const entry: SnapshotEntry = {
      entryOffset: 0,
      l1TableOffset: 0,
      l1Size: header.l1Size,
      id: nextSnapshotId(table.entries),
      name,
      ...now(),
      vmClockNsec: 0n,
      vmStateSize: 0,
      diskSize: image.size,
      icount: 0n,
      extraData: Buffer.alloc(0),
    };
    const before = table.entries.length > 0 ? align8(encodeSnapshotTable(table.entries, header.size).length) : 0;
    const bytes = encodeSnapshotTable([...table.entries, entry], header.size);
    if (bytes.length > MAX_SNAPSHOT_TABLE_SIZE) {
      throw new Qcow2Error('EFBIG', `the snapshot table would take ${bytes.length} bytes, more than qemu's ${MAX_SNAPSHOT_TABLE_SIZE}`);
    }
    const result = await settle(
      image.engine.changeSnapshots({
        kind: 'create',
        table: bytes,
        count: table.entries.length + 1,
        l1OffsetAt: before,
        keptL1s: l1sOf(table.entries),
        ...tableFields(header, table),
      }),
    );
    return { ...entry, l1TableOffset: result.l1Offset, entryOffset: result.tableOffset + before };
  });
}

/**
 * Make the image's current state the one of snapshot `idOrName` (an ID or a name, as qemu-img
 * snapshot -a matches it); the virtual size becomes the snapshot's. ENOENT when there is none.
 */
export async function applySnapshot(target: SnapshotTarget, idOrName: string, options: SnapshotOptions = {}): Promise<SnapshotEntry> {
  checkName(idOrName, 'snapshot');
  return withQcow2(target, options, false, async (image) => {
    const { header, table } = await readTable(image);
    // qemu's apply picks the first snapshot whose ID is `idOrName`, else the first so named.
    if (header.bitmaps && header.bitmaps.nbBitmaps > 0 && header.bitmapsAutoclear) {
      // The bitmaps would not describe the change of contents; qemu refuses as well (before looking for the snapshot).
      throw new Qcow2Error('EBUSY', `'${image.path}' has persistent dirty bitmaps: applying a snapshot would leave them wrong`);
    }
    const snapshot = findSnapshot(table.entries, idOrName);
    if (!snapshot) throw new Qcow2Error('ENOENT', `'${image.path}' has no snapshot with the ID or name '${idOrName}'`);
    const diskSize = snapshot.diskSize ?? image.size;
    if (diskSize !== image.size) await image.resize(diskSize, { shrink: true });
    await settle(
      image.engine.changeSnapshots({
        kind: 'apply',
        l1Offset: snapshot.l1TableOffset,
        l1Entries: snapshot.l1Size,
        count: table.entries.length,
        keptL1s: l1sOf(table.entries),
        ...tableFields(header, table),
      }),
    );
    return snapshot;
  });
}

/**
 * Delete the first snapshot named `name` (qemu-img snapshot -d matches names only): its clusters
 * lose a reference and those left with none are discarded. ENOENT when there is none.
 */
export async function deleteSnapshot(target: SnapshotTarget, name: string, options: SnapshotOptions = {}): Promise<SnapshotEntry> {
  checkName(name, 'snapshot name');
  return withQcow2(target, options, false, async (image) => {
    const { header, table } = await readTable(image);
    const snapshot = table.entries.find((e) => e.name === name);
    if (!snapshot) throw new Qcow2Error('ENOENT', `'${image.path}' has no snapshot named '${name}'`);
    const kept = table.entries.filter((e) => e !== snapshot);
    await settle(
      image.engine.changeSnapshots({
        kind: 'delete',
        l1Offset: snapshot.l1TableOffset,
        l1Entries: snapshot.l1Size,
        table: encodeSnapshotTable(kept, header.size),
        count: kept.length,
        keptL1s: l1sOf(kept),
        ...tableFields(header, table),
      }),
    );
    return snapshot;
  });
}
