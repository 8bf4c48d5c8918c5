/**
 * Disks for the concurrency proof: an overlay over a backing chain (a qcow2 or raw base whose
 * every sector names itself, holes, zero and compressed clusters), made with qemu-img and qemu-io,
 * with some data, zeros and compressed clusters of its own.
 */
import { writeFile } from 'node:fs/promises';
import path from 'node:path';

import { SECTOR } from './concurrency-model.js';
import { qemuImg, qemuIo } from './qemu.js';

/** What lies under the overlay. */
export type BaseKind = 'qcow2' | 'raw' | 'raw-under-qcow2' | 'none';

/** One disk to prove: the overlay's qemu-img options and its backing chain. */
export interface DiskSpec {
  /** Virtual size in bytes, a multiple of the sector. */
  size: number;
  clusterSize: number;
  compat: '0.10' | '1.1';
  extendedL2?: boolean;
  refcountBits?: number;
  base: BaseKind;
}

/** Marks the first word of every base sector ("BASE"), followed by the sector's index. */
const BASE_MARK = 0x42415345;

/** Base content: each sector names itself; a run in the first third is left as a hole. */
function baseBytes(size: number): Buffer {
  const bytes = Buffer.alloc(size);
  for (let s = 0; s < size / SECTOR; s++) {
    bytes.writeUInt32BE(BASE_MARK, s * SECTOR);
    bytes.writeUInt32BE(s, s * SECTOR + 4);
    bytes.fill(s & 0xff, s * SECTOR + 8, (s + 1) * SECTOR);
  }
  const hole = Math.floor(size / 3 / SECTOR) * SECTOR;
  bytes.fill(0, hole, hole + Math.min(size - hole, 64 * 1024));
  return bytes;
}

/** A base shorter than the overlay, ending inside a cluster, so reads past its end see zeros. */
function baseSize(spec: DiskSpec): number {
  return Math.floor((spec.size * 3) / 4 / spec.clusterSize) * spec.clusterSize + 3 * SECTOR;
}

async function makeRawBase(file: string, size: number): Promise<void> {
  await writeFile(file, baseBytes(size));
}

/** A qcow2 base with other clusters than the overlay's, some of them zero and some compressed. */
async function makeQcow2Base(file: string, size: number, spec: DiskSpec): Promise<void> {
  await makeRawBase(`${file}.raw`, size);
  const clusterSize = spec.clusterSize === 65536 ? 16384 : 65536;
  const compat = `compat=${spec.compat}`;
  await qemuImg('convert', '-q', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${clusterSize},${compat}`, `${file}.raw`, file);
  const quarter = Math.floor(size / 4 / clusterSize) * clusterSize;
  // A compressed write needs an unallocated cluster: the discard makes one.
  const commands = [
    `write -q -z ${quarter} ${clusterSize}`,
    `discard -q ${2 * quarter} ${clusterSize}`,
    `write -q -c -P 0x5c ${2 * quarter} ${clusterSize}`,
  ];
  await qemuIo('-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), file);
}

/** A qcow2 image over a raw base, with data and zeros of its own: a chain of three. */
async function makeMiddle(dir: string, spec: DiskSpec): Promise<string> {
  const raw = path.join(dir, 'base.raw');
  await makeRawBase(raw, baseSize(spec));
  const mid = path.join(dir, 'mid.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', `compat=${spec.compat}`, '-b', 'base.raw', '-F', 'raw', mid, String(spec.size));
  const eighth = Math.floor(spec.size / 8 / SECTOR) * SECTOR;
  const commands = [`write -q -P 0x4d ${eighth + SECTOR} ${3 * eighth}`, `write -q -z ${5 * eighth} ${eighth}`];
  await qemuIo('-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), mid);
  return 'mid.qcow2';
}

/** The overlay's own content before the run: data, plain and unmapped zeros, compressed clusters, a discard. */
async function populateOverlay(file: string, spec: DiskSpec): Promise<void> {
  const cs = spec.clusterSize;
  const clusters = Math.floor(spec.size / cs);
  const at = (fraction: number) => Math.floor(clusters * fraction) * cs;
  await qemuIo(
    '-f',
    'qcow2',
    '-c',
    `write -q -P 0x61 ${at(0.05) + SECTOR} ${2 * cs}`,
    '-c',
    `write -q -c -P 0x63 ${at(0.2)} ${2 * cs}`,
    '-c',
    `write -q -z ${at(0.3)} ${2 * cs}`,
    '-c',
    `write -q -P 0x62 ${at(0.45)} ${3 * cs}`,
    '-c',
    `write -q -z -u ${at(0.45) + cs} ${cs}`,
    '-c',
    `discard -q ${at(0.6)} ${cs}`,
    '-c',
    `write -q -P 0x64 ${at(0.7) + 2 * SECTOR} ${4 * cs}`,
    file,
  );
}

/** Make the overlay (and its chain) in `dir`; returns the overlay's path. */
export async function makeDisk(dir: string, spec: DiskSpec): Promise<string> {
  const options = [`compat=${spec.compat}`, `cluster_size=${spec.clusterSize}`];
  if (spec.extendedL2) options.push('extended_l2=on');
  if (spec.refcountBits) options.push(`refcount_bits=${spec.refcountBits}`);
  const backing: string[] = [];
  if (spec.base === 'qcow2') {
    await makeQcow2Base(path.join(dir, 'base.qcow2'), baseSize(spec), spec);
    backing.push('-b', 'base.qcow2', '-F', 'qcow2');
  } else if (spec.base === 'raw') {
    await makeRawBase(path.join(dir, 'base.raw'), baseSize(spec));
    backing.push('-b', 'base.raw', '-F', 'raw');
  } else if (spec.base === 'raw-under-qcow2') {
    backing.push('-b', await makeMiddle(dir, spec), '-F', 'qcow2');
  }
  const file = path.join(dir, 'disk.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', options.join(','), ...backing, file, String(spec.size));
  await populateOverlay(file, spec);
  return file;
}
