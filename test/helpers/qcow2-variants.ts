/** qcow2 images made by qemu-img with every creation option the header can record, for header and info tests. */
import { execFile } from 'node:child_process';
import path from 'node:path';

import { qemuImg } from './qemu.js';

/** Run qemu-img in `dir`: relative names it creates (data files) land there, and are recorded relative. */
export function qemuImgIn(dir: string, ...args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('qemu-img', args, { cwd: dir, encoding: 'utf8' }, (error, stdout, stderr) => {
      if (error) reject(new Error(`qemu-img ${args.join(' ')} failed: ${stderr}`));
      else resolve(stdout);
    });
  });
}

/** One kind of image: how qemu-img makes it, and header fields it must have. */
export interface Variant {
  name: string;
  /** Create the image (and whatever it needs) in `dir`; returns its path. */
  make(dir: string): Promise<string>;
  /** Header fields the parsed image must show. */
  expect: Record<string, unknown>;
  /** The image has a backing file (so --backing-chain shows more than one image). */
  chain?: boolean;
}

function create(dir: string, name: string, size: string, options: string[] = []): Promise<string> {
  return qemuImgIn(dir, 'create', '-f', 'qcow2', ...options, name, size).then(() => path.join(dir, name));
}

const refcountVariants: Variant[] = [1, 2, 4, 8, 16, 32, 64].map((bits) => ({
  name: `refcount_bits=${bits}`,
  make: (dir) => create(dir, `rc${bits}.qcow2`, '64M', ['-o', `refcount_bits=${bits}`]),
  expect: { refcountOrder: Math.log2(bits) },
}));

const clusterVariants: Variant[] = [
  [512, 9, '100M'],
  [4096, 12, '1G'],
  [65536, 16, '1G'],
  [2097152, 21, '3G'],
].map(([size, bits, disk]) => ({
  name: `cluster_size=${size}`,
  make: (dir) => create(dir, `cl${size}.qcow2`, String(disk), ['-o', `cluster_size=${size}`]),
  expect: { clusterBits: bits, clusterSize: size },
}));

/** Every variant; each makes its files under its own names, so they can share a folder. */
export const VARIANTS: Variant[] = [
  {
    name: 'compat=1.1 defaults',
    make: (dir) => create(dir, 'v3.qcow2', '1G'),
    expect: { version: 3, headerLength: 112, compressionType: 'zlib', size: 1 << 30, dirty: false, lazyRefcounts: false },
  },
  {
    name: 'compat=0.10',
    make: (dir) => create(dir, 'v2.qcow2', '100M', ['-o', 'compat=0.10']),
    expect: { version: 2, headerLength: 72, refcountOrder: 4, incompatibleFeatures: 0n },
  },
  ...clusterVariants,
  ...refcountVariants,
  {
    name: 'lazy_refcounts',
    make: (dir) => create(dir, 'lazy.qcow2', '10M', ['-o', 'lazy_refcounts=on']),
    expect: { lazyRefcounts: true, compatibleFeatures: 1n },
  },
  {
    name: 'extended_l2',
    make: (dir) => create(dir, 'el2.qcow2', '5G', ['-o', 'extended_l2=on']),
    expect: { extendedL2: true },
  },
  {
    name: 'extended_l2 with 2M clusters and zstd',
    make: (dir) => create(dir, 'el2z.qcow2', '1152M', ['-o', 'extended_l2=on,cluster_size=2M,compression_type=zstd']),
    expect: { extendedL2: true, compressionType: 'zstd', clusterBits: 21 },
  },
  {
    name: 'compression_type=zstd',
    make: (dir) => create(dir, 'zstd.qcow2', '1M', ['-o', 'compression_type=zstd']),
    expect: { compressionType: 'zstd', incompatibleFeatures: 8n },
  },
  {
    name: 'data_file',
    make: (dir) => create(dir, 'df.qcow2', '16M', ['-o', `data_file=${path.join(dir, 'df.data')}`]),
    expect: { externalDataFile: true, dataFileRaw: false },
  },
  {
    name: 'data_file + data_file_raw',
    make: (dir) => create(dir, 'dfr.qcow2', '16M', ['-o', 'data_file=dfr.data,data_file_raw=on']),
    expect: { externalDataFile: true, dataFileRaw: true, dataFile: 'dfr.data' },
  },
  {
    name: 'backing chain with -F (relative name)',
    chain: true,
    make: async (dir) => {
      const base = await create(dir, 'chain-base.qcow2', '64M');
      await create(dir, 'chain-mid.qcow2', '64M', ['-b', path.basename(base), '-F', 'qcow2']);
      return create(dir, 'chain-top.qcow2', '128M', ['-b', 'chain-mid.qcow2', '-F', 'qcow2']);
    },
    expect: { backingFile: 'chain-mid.qcow2', backingFormat: 'qcow2' },
  },
  {
    name: 'backing file raw, absolute name, with data file',
    chain: true,
    make: async (dir) => {
      const base = path.join(dir, 'rawbase.img');
      await qemuImg('create', '-f', 'raw', base, '3M');
      return create(dir, 'over-raw.qcow2', '5M', ['-b', base, '-F', 'raw', '-o', 'data_file=over-raw.data']);
    },
    expect: { backingFormat: 'raw', dataFile: 'over-raw.data' },
  },
  {
    name: 'compat=0.10 with backing file',
    chain: true,
    make: async (dir) => {
      await create(dir, 'v2base.qcow2', '32M', ['-o', 'compat=0.10']);
      return create(dir, 'v2over.qcow2', '32M', ['-o', 'compat=0.10', '-b', 'v2base.qcow2', '-F', 'qcow2']);
    },
    expect: { version: 2, backingFile: 'v2base.qcow2' },
  },
  {
    name: 'snapshots',
    make: async (dir) => {
      const file = await create(dir, 'snap.qcow2', '64M');
      for (const name of ['first', 'a "quoted"\\ name with/slash', 'ünïcödé €', '']) await qemuImg('snapshot', '-c', name, file);
      return file;
    },
    expect: { nbSnapshots: 4 },
  },
  {
    name: 'compat=0.10 with a snapshot',
    make: async (dir) => {
      const file = await create(dir, 'v2snap.qcow2', '8M', ['-o', 'compat=0.10']);
      await qemuImg('snapshot', '-c', 'old', file);
      return file;
    },
    expect: { version: 2, nbSnapshots: 1 },
  },
  {
    name: 'bitmaps',
    make: async (dir) => {
      const file = await create(dir, 'bitmaps.qcow2', '100M');
      await qemuImg('bitmap', '--add', file, 'b0');
      await qemuImg('bitmap', '--add', '-g', '128k', '--disable', file, 'second-bitmap');
      await qemuImg('bitmap', '--add', '-g', '512', file, 'fine');
      return file;
    },
    expect: { bitmapsAutoclear: true, bitmaps: { nbBitmaps: 3 } },
  },
  {
    name: 'everything at once',
    chain: true,
    make: async (dir) => {
      await create(dir, 'all-base.qcow2', '200M', ['-o', 'cluster_size=16k,extended_l2=on']);
      const file = await create(dir, 'all.qcow2', '200M', [
        '-b',
        'all-base.qcow2',
        '-F',
        'qcow2',
        '-o',
        'cluster_size=32k,extended_l2=on,compression_type=zstd,lazy_refcounts=on,refcount_bits=8,data_file=all.data',
      ]);
      await qemuImgIn(dir, 'bitmap', '--add', file, 'bm');
      return file;
    },
    expect: { clusterBits: 15, refcountOrder: 3, extendedL2: true, lazyRefcounts: true, compressionType: 'zstd' },
  },
];
