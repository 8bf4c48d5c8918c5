/** What the native walker (check, refcount rebuild) visits: the header's tables plus the snapshot table and bitmap directory decoded here. */
import type { Qcow2WalkParams } from '../native.js';
import { readBitmapTables } from './bitmaps.js';
import { align8 } from './extensions.js';
import { HEADER_FIELD_OFFSETS, Qcow2Header } from './header.js';
import { openMetadataFile } from './metadata-file.js';
import { SnapshotTable, readSnapshots } from './snapshots.js';
import { encodeName } from './text.js';

/** Bytes of the snapshot table up to the end of its last entry (qemu counts no padding after it). */
function snapshotTableBytes(table: SnapshotTable): number {
  const last = table.entries[table.entries.length - 1];
  if (!last) return 0;
  const length = 40 + last.extraData.length + encodeName(last.id).length + encodeName(last.name).length;
  return table.byteLength - (align8(length) - length);
}

/** The walk of `imagePath` whose header is `header`; a bitmap directory that cannot be decoded is passed as invalid. */
export async function walkParams(imagePath: string, header: Qcow2Header): Promise<Qcow2WalkParams> {
  const metadata = await openMetadataFile(imagePath);
  try {
    const snapshots = await readSnapshots(metadata, header, false);
    const params: Qcow2WalkParams = {
      clusterBits: header.clusterBits,
      refcountOrder: header.refcountOrder,
      extendedL2: header.extendedL2,
      externalDataFile: header.externalDataFile,
      size: header.size,
      l1TableOffset: header.l1TableOffset,
      l1Size: header.l1Size,
      snapshots: snapshots.entries.map((e) => ({ offset: e.l1TableOffset, entries: e.l1Size, id: e.id, name: e.name })),
      snapshotsOffset: header.snapshotsOffset,
      snapshotsBytes: snapshotTableBytes(snapshots),
      refcountTableOffset: header.refcountTableOffset,
      refcountTableClusters: header.refcountTableClusters,
      cryptoOffset: header.fullDiskEncryption?.offset ?? 0,
      cryptoBytes: header.fullDiskEncryption?.length ?? 0,
      headerFields: HEADER_FIELD_OFFSETS,
    };
    // Without the autoclear bit qemu ignores the bitmaps: their clusters count as leaked.
    if (header.bitmaps && header.bitmaps.nbBitmaps > 0 && header.bitmapsAutoclear) {
      const directory = { directoryOffset: header.bitmaps.bitmapDirectoryOffset, directoryBytes: header.bitmaps.bitmapDirectorySize };
      try {
        params.bitmaps = { ...directory, valid: true, tables: await readBitmapTables(metadata, header) };
      } catch {
        params.bitmaps = { ...directory, valid: false, tables: [] };
      }
    }
    return params;
  } finally {
    await metadata.handle.close();
  }
}
