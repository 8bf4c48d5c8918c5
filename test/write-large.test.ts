/**
 * Requests and tables larger than one refcount block's reach (small clusters, wide refcounts), and
 * shrinking that gives back whole L2 tables and the end of the file, each compared with qemu-img.
 */
import { copyFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { openQcow2, readHeader } from '../ts/index.js';
import { native } from '../ts/native.js';
import { HEADER_FIELD_OFFSETS } from '../ts/qcow2/header.js';
import { patternBytes, qcow2Cli, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';

const MiB = 1 << 20;

/** qemu-img check finds nothing (no errors, no leaks); returns the image end offset it reports. */
async function checkClean(t: ExecutionContext, file: string): Promise<number> {
  const check = await runProgram('qemu-img', ['check', '--output=json', file]);
  t.is(check.code, 0, check.stdout + check.stderr);
  const result = JSON.parse(check.stdout) as { 'image-end-offset': number; leaks?: number; corruptions?: number };
  t.falsy(result.leaks, `${file}: leaks`);
  t.falsy(result.corruptions, `${file}: corruptions`);
  return result['image-end-offset'];
}

async function ours(t: ExecutionContext, ...args: string[]): Promise<void> {
  const r = await qcow2Cli(...args);
  t.is(r.code, 0, `qcow2 ${args.join(' ')}: ${r.stderr}`);
}

test('convert -O qcow2 with 512-byte clusters: writes spanning many refcount blocks, plain and compressed', async (t) => {
  const dir = await tempDir(t);
  const source = path.join(dir, 'src.raw');
  const data = patternBytes(24 * MiB, 7);
  data.fill(0, 8 * MiB, 12 * MiB);
  await writeFile(source, data);
  // Each request of convert covers far more than a refcount block describes (128 KiB, and 32 KiB with 64-bit refcounts).
  for (const args of [['-o', 'cluster_size=512'], ['-o', 'cluster_size=512,refcount_bits=64'], ['-c', '-o', 'cluster_size=512,refcount_bits=64']]) {
    const target = path.join(dir, 'out.qcow2');
    await ours(t, 'convert', '-f', 'raw', '-O', 'qcow2', ...args, source, target);
    await checkClean(t, target);
    await qemuImg('compare', '-q', '-f', 'raw', '-F', 'qcow2', source, target);
  }
});

test('one write of 8 MiB into an image of 512-byte clusters and 64-bit refcounts (256 refcount blocks)', async (t) => {
  const file = path.join(await tempDir(t), 'img.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=64', file, '16M');
  const data = patternBytes(8 * MiB, 3);
  const image = await openQcow2(file);
  try {
    await image.write(data, 4 * MiB + 512);
    await image.flush();
  } finally {
    await image.close();
  }
  await checkClean(t, file);
  const back = Buffer.alloc(data.length);
  const reopened = await openQcow2(file, { readOnly: true });
  try {
    await reopened.read(back, 4 * MiB + 512);
  } finally {
    await reopened.close();
  }
  t.true(back.equals(data));
});

test('an L1 table and a refcount table longer than a refcount block reaches (512-byte clusters, 64-bit refcounts)', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'img.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=64', file, '1M');
  // A block counts 64 clusters: 2 GiB needs an L1 table of 512 clusters, 140 MiB of file a refcount table of 70.
  await ours(t, 'resize', file, '2G');
  await ours(t, 'resize', '--preallocation=falloc', file, '+140M');
  const { header } = await readHeader(file);
  t.true(Math.ceil((header.l1Size * 8) / 512) > 64, `L1 table of ${header.l1Size} entries`);
  t.true(header.refcountTableClusters > 64, `refcount table of ${header.refcountTableClusters} clusters`);
  await ours(t, 'io', '-c', `write -P 9 ${2 * 1024 * MiB - MiB} 1M`, '-c', 'write -P 8 0 64k', file);
  await checkClean(t, file);
  const read = await runProgram('qemu-io', ['-r', '-c', `read -P 9 ${2 * 1024 * MiB - MiB} 1M`, '-c', 'read -P 8 0 64k', file]);
  t.notRegex(read.stdout, /fail/i, read.stdout);
});

/** Twin images with data past the new end, shrunk by qemu-img and by us. */
async function shrinkBoth(t: ExecutionContext, options: string, size: string, writes: string[], newSize: string, snapshot = false) {
  const dir = await tempDir(t);
  const theirs = path.join(dir, 'theirs.qcow2');
  const mine = path.join(dir, 'ours.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', options, theirs, size);
  await qemuIo(...writes.flatMap((w) => ['-c', w]), theirs);
  if (snapshot) {
    await qemuImg('snapshot', '-c', 's1', theirs);
    // Rewritten after the snapshot (compressed writes need unallocated clusters: left out).
    const rewrites = writes.filter((w) => !w.includes(' -c ')).map((w) => w.replace(/-P \d+/, '-P 5'));
    await qemuIo(...rewrites.flatMap((w) => ['-c', w]), theirs);
  }
  await copyFile(theirs, mine);
  await qemuImg('resize', '-q', '--shrink', theirs, newSize);
  await ours(t, 'resize', '--shrink', mine, newSize);
  await qemuImg('compare', '-q', theirs, mine);
  const [a, b] = [await checkClean(t, mine), await checkClean(t, theirs)];
  const cluster = (await readHeader(mine)).header.clusterSize;
  t.true(a <= b + 4 * cluster, `${options}: image end offset ${a} vs qemu-img's ${b}`);
  t.true((await stat(mine)).size <= (await stat(theirs)).size + 4 * cluster, `${options}: file size`);
}

test('shrink frees the L2 tables and clusters past the end and cuts the file like qemu-img resize --shrink', async (t) => {
  // qemu-img's shrink takes long on many small clusters: the sizes stay small.
  await shrinkBoth(t, 'cluster_size=4096', '256M', ['write -P 1 0 1M', 'write -P 2 200M 1M', 'write -c -P 3 100M 64k'], '30M');
  await shrinkBoth(t, 'cluster_size=512,refcount_bits=64', '40M', ['write -P 1 0 1M', 'write -P 2 30M 1M', 'write -c -P 3 20M 64k'], '4M');
  await shrinkBoth(t, 'cluster_size=65536', '8G', ['write -P 1 0 1M', 'write -P 2 5G 1M', 'write -c -P 3 3G 64k'], '1G');
});

test('shrink of an image with a snapshot: shared tables and clusters lose the active reference only', async (t) => {
  await shrinkBoth(t, 'cluster_size=4096', '256M', ['write -P 1 0 1M', 'write -P 2 200M 1M', 'write -c -P 3 100M 64k'], '30M', true);
  await shrinkBoth(t, 'cluster_size=512', '40M', ['write -P 1 0 1M', 'write -P 2 30M 1M', 'write -c -P 3 20M 64k'], '24M', true);
});

test('header fields the engine writes come from ts/qcow2/header.ts: a writable engine without them is refused', async (t) => {
  const file = path.join(await tempDir(t), 'img.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', file, '1M');
  const { header } = await readHeader(file);
  const handle = await native.NativeFile.open(file, { writable: true, cache: 'writeback' });
  try {
    const params = {
      clusterBits: header.clusterBits,
      size: header.size,
      l1TableOffset: header.l1TableOffset,
      l1Size: header.l1Size,
      refcountOrder: header.refcountOrder,
      writable: true,
      version: header.version,
      refcountTableOffset: header.refcountTableOffset,
      refcountTableClusters: header.refcountTableClusters,
    };
    t.throws(() => native.Qcow2Engine.open(handle, params), { instanceOf: TypeError, message: /headerFields/ });
    const engine = await native.Qcow2Engine.open(handle, { ...params, headerFields: HEADER_FIELD_OFFSETS });
    await engine.resize(2 * MiB);
    await engine.close();
  } finally {
    await handle.close();
  }
  t.is((await readHeader(file)).header.size, 2 * MiB);
  await checkClean(t, file);
});
