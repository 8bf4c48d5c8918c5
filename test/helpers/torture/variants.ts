/** The kinds of image the crash torture runs on, and how each starts. */
import { access, writeFile } from 'node:fs/promises';
import path from 'node:path';

import { qemuImg } from '../qemu.js';
import { Geometry } from './ops.js';
import { dataBytes } from './random.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** One kind of image: its creation options, its disk and the operations aimed at it. */
export interface TortureVariant {
  name: string;
  /** The disk size of a fresh image. */
  size: number;
  geometry: Geometry;
  /** qemu-img create -o options. */
  options: string;
  /** The image is an overlay over a qcow2 base full of seeded data (with holes). */
  backing?: boolean;
  /**
   * Every other round is written by qemu-io, which then kills itself (with lazy refcounts it
   * leaves the image dirty, as a crashed QEMU does; our next open must rebuild the refcounts).
   */
  qemuCrashes?: boolean;
}

export const TORTURE_VARIANTS: TortureVariant[] = [
  { name: 'plain', size: 16 * MiB, geometry: { clusterSize: 64 * KiB, compressed: true }, options: 'cluster_size=65536' },
  {
    name: 'clusters-512-refcount64',
    size: 2 * MiB,
    geometry: { clusterSize: 512, compressed: false },
    options: 'cluster_size=512,refcount_bits=64',
  },
  {
    name: 'clusters-512-growing',
    size: 512 * KiB,
    geometry: { clusterSize: 512, compressed: true, maxSize: 6 * MiB },
    options: 'cluster_size=512',
  },
  { name: 'clusters-4k', size: 16 * MiB, geometry: { clusterSize: 4 * KiB, compressed: true }, options: 'cluster_size=4096' },
  {
    name: 'lazy-refcounts',
    size: 16 * MiB,
    geometry: { clusterSize: 64 * KiB, compressed: true },
    options: 'cluster_size=65536,lazy_refcounts=on',
    qemuCrashes: true,
  },
  {
    name: 'backing',
    size: 16 * MiB,
    geometry: { clusterSize: 64 * KiB, compressed: true },
    options: 'cluster_size=65536',
    backing: true,
  },
  {
    name: 'extended-l2-backing',
    size: 16 * MiB,
    geometry: { clusterSize: 64 * KiB, compressed: true },
    options: 'cluster_size=65536,extended_l2=on',
    backing: true,
  },
];

/** The variant called `name`, or an error listing the names. */
export function variantNamed(name: string): TortureVariant {
  const variant = TORTURE_VARIANTS.find((v) => v.name === name);
  if (!variant) throw new Error(`no torture variant '${name}' (${TORTURE_VARIANTS.map((v) => v.name).join(', ')})`);
  return variant;
}

/** How long the model of a variant's disk is: the largest size the disk can reach. */
export function modelLength(variant: TortureVariant): number {
  return variant.geometry.maxSize ?? variant.size;
}

/** The guest bytes of the backing base: seeded data with two holes (qemu-img convert leaves them unallocated). */
function baseBytes(variant: TortureVariant): Buffer {
  const bytes = dataBytes(variant.size, 0xba5e);
  bytes.fill(0, variant.size / 4, variant.size / 4 + 3 * 64 * KiB);
  bytes.fill(0, variant.size / 2, variant.size / 2 + 5 * 64 * KiB);
  return bytes;
}

/**
 * Make a fresh image of `variant` at `file` (and its base next to it, once); returns the guest
 * bytes it starts with, as long as modelLength().
 */
export async function freshImage(variant: TortureVariant, file: string): Promise<Buffer> {
  const model = Buffer.alloc(modelLength(variant));
  const args = ['create', '-q', '-f', 'qcow2', '-o', variant.options];
  if (variant.backing) {
    const base = path.join(path.dirname(file), 'base.qcow2');
    const bytes = baseBytes(variant);
    if (!(await exists(base))) {
      await writeFile(`${base}.raw`, bytes);
      await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', `${base}.raw`, base);
    }
    bytes.copy(model);
    args.push('-b', base, '-F', 'qcow2');
  }
  await qemuImg(...args, file, String(variant.size));
  return model;
}

async function exists(file: string): Promise<boolean> {
  try {
    await access(file);
    return true;
  } catch {
    return false;
  }
}
