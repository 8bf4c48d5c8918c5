/** The seed images of the read-side fuzz tests: small (4 MiB disks) and each showing one feature of the format. */
import { writeFile } from 'node:fs/promises';
import path from 'node:path';

import type { RegionName } from './fuzz-layout.js';
import { qemuIo } from './qemu.js';
import { qemuImgIn } from './qcow2-variants.js';

/** One seed: how qemu-img and qemu-io make it, and whether opening it must follow the file names it records. */
export interface Seed {
  name: string;
  /** Make the image (and the files it names) in `dir`; returns the image's path. */
  make(dir: string): Promise<string>;
  /** The image names a backing file or a data file. */
  follow: boolean;
  /** Structures beyond the common ones (header, extensions, L1, L2, refcounts) the mutations must reach. */
  regions: RegionName[];
}

const DISK = '4M';

async function create(dir: string, name: string, ...options: string[]): Promise<string> {
  await qemuImgIn(dir, 'create', '-f', 'qcow2', ...options, name, DISK);
  return path.join(dir, name);
}

async function writes(file: string, ...commands: string[]): Promise<string> {
  await qemuIo(file, ...commands.flatMap((c) => ['-c', c]));
  return file;
}

/** A raw file of text lines with a zero hole in the middle: it compresses well, and part of it is zero. */
async function compressibleRaw(dir: string): Promise<string> {
  const content = Buffer.alloc(2 << 20);
  for (let at = 0; at < content.length; at += 64) {
    if (at < (512 << 10) || at >= (768 << 10)) content.write(`line ${at} of the seed\n`, at);
  }
  const file = path.join(dir, 'source.raw');
  await writeFile(file, content);
  return file;
}

async function compressed(dir: string, name: string, options: string): Promise<string> {
  await qemuImgIn(dir, 'convert', '-c', '-O', 'qcow2', '-o', options, await compressibleRaw(dir), name);
  return path.join(dir, name);
}

/** Data, zero clusters and a discarded range: the common kinds of L2 entries. */
const MIXED = ['write -P 1 0 64k', 'write -P 2 1M 100k', 'write -z 2M 128k', 'write -P 3 3M 64k', 'discard 3M 64k', 'write -P 4 4032k 64k'];

/** Every seed; each makes its files under its own names, so they may share a folder. */
export const SEEDS: Seed[] = [
  {
    name: 'v2, 64 KiB clusters',
    make: async (dir) => writes(await create(dir, 'v2.qcow2', '-o', 'compat=0.10'), ...MIXED),
    follow: false,
    regions: [],
  },
  {
    name: 'v3, 512 B clusters',
    make: async (dir) => writes(await create(dir, 'small.qcow2', '-o', 'cluster_size=512'), ...MIXED, 'write -P 5 5k 1536'),
    follow: false,
    regions: [],
  },
  {
    name: 'v3, 64 KiB clusters, 64-bit refcounts',
    make: async (dir) => writes(await create(dir, 'v3.qcow2', '-o', 'refcount_bits=64'), ...MIXED),
    follow: false,
    regions: [],
  },
  {
    name: 'zlib compressed, 4 KiB clusters',
    make: (dir) => compressed(dir, 'zlib.qcow2', 'cluster_size=4096,compression_type=zlib'),
    follow: false,
    regions: ['compressedDescriptors', 'compressedData'],
  },
  {
    name: 'zstd compressed, 64 KiB clusters',
    make: (dir) => compressed(dir, 'zstd.qcow2', 'cluster_size=65536,compression_type=zstd'),
    follow: false,
    regions: ['compressedDescriptors', 'compressedData'],
  },
  {
    name: 'extended L2, 64 KiB clusters',
    make: async (dir) =>
      writes(
        await create(dir, 'ext-l2.qcow2', '-o', 'extended_l2=on'),
        'write -P 1 0 4k',
        'write -P 2 70k 2k',
        'write -z 128k 8k',
        'write -c -P 3 1M 64k',
        'write -P 4 2M 64k',
        'write -z 2052k 4k',
      ),
    follow: false,
    regions: ['compressedDescriptors', 'compressedData', 'l2Bitmaps'],
  },
  {
    name: 'backing file',
    make: async (dir) => {
      await writes(await create(dir, 'base.qcow2'), 'write -P 7 0 1M', 'write -P 8 3M 1M');
      return writes(await create(dir, 'overlay.qcow2', '-b', 'base.qcow2', '-F', 'qcow2'), 'write -P 1 512k 64k', 'write -z 3M 64k', 'write -P 2 3200k 4k');
    },
    follow: true,
    regions: [],
  },
  {
    name: 'internal snapshots',
    make: async (dir) => {
      const file = await writes(await create(dir, 'snap.qcow2'), 'write -P 1 0 128k');
      await qemuImgIn(dir, 'snapshot', '-c', 'first', 'snap.qcow2');
      await writes(file, 'write -P 2 64k 128k');
      await qemuImgIn(dir, 'snapshot', '-c', 'a second snapshot', 'snap.qcow2');
      return writes(file, 'write -P 3 1M 64k');
    },
    follow: false,
    regions: ['snapshotTable', 'snapshotL1'],
  },
  {
    name: 'persistent bitmaps',
    make: async (dir) => {
      const file = await create(dir, 'bitmap.qcow2');
      await qemuImgIn(dir, 'bitmap', '--add', 'bitmap.qcow2', 'b0');
      await qemuImgIn(dir, 'bitmap', '--add', '-g', '512k', 'bitmap.qcow2', 'another bitmap');
      return writes(file, 'write -P 1 0 64k', 'write -P 2 2M 4k');
    },
    follow: false,
    regions: ['bitmapDirectory', 'bitmapTables'],
  },
  {
    name: 'external data file',
    // An absolute name: qemu-io opens a relative data file name from its working directory.
    make: async (dir) => writes(await create(dir, 'ext.qcow2', '-o', `data_file=${path.join(dir, 'data.raw')}`), ...MIXED),
    follow: true,
    regions: [],
  },
];
