/**
 * Write-path regressions found outside the write tests (torture, concurrency proof), each kept
 * as the smallest story that showed it.
 */
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { deflateRawSync } from 'node:zlib';

import test from 'ava';

import { Qcow2Image, open } from '../ts/index.js';
import { qcow2Cli, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';
import { random } from './helpers/random.js';

/** A cluster that compresses to a size of its own: `noise` random bytes, then text. */
function unevenCluster(size: number, next: () => number): Buffer {
  const cluster = Buffer.from('compressed data packed back to back '.repeat(Math.ceil(size / 36)).slice(0, size));
  const noise = Math.floor(next() * size * 0.6);
  for (let i = 0; i < noise; i++) cluster[i] = Math.floor(next() * 256);
  return cluster;
}

for (const [cache, clusterSize] of [['none', 512], ['none', 65536], ['writeback', 4096]] as const) {
  test(`compressed writes in flight at once share sectors and keep every byte (cache ${cache}, ${clusterSize}-byte clusters)`, async (t) => {
    const dir = await tempDir(t);
    const image = path.join(dir, 'packed.qcow2');
    const clusters = 96;
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${clusterSize}`, image, String(clusters * clusterSize));
    const next = random(clusterSize);
    const expected = Buffer.concat(Array.from({ length: clusters }, () => unevenCluster(clusterSize, next)));
    const disk = await open(image, { readOnly: false, cache });
    if (!(disk instanceof Qcow2Image)) throw new Error('a qcow2 image');
    // Requests of one to three clusters, all issued before any completes, so their data shares sectors.
    const writes: Promise<void>[] = [];
    for (let c = 0; c < clusters; ) {
      const n = Math.min(clusters - c, 1 + (c % 3));
      writes.push(disk.writeCompressed(expected.subarray(c * clusterSize, (c + n) * clusterSize), c * clusterSize));
      c += n;
    }
    await Promise.all(writes);
    const back = Buffer.alloc(expected.length);
    await disk.read(back, 0);
    t.true(back.equals(expected), 'reads through the open image');
    await disk.close();
    const report = JSON.parse(await qemuImg('check', '--output=json', image)) as {
      corruptions?: number;
      leaks?: number;
      'compressed-clusters'?: number;
    };
    t.is(report.corruptions ?? 0, 0);
    t.is(report.leaks ?? 0, 0);
    t.true((report['compressed-clusters'] ?? 0) > clusters / 2);
    const raw = path.join(dir, 'back.raw');
    await qemuImg('convert', '-O', 'raw', image, raw);
    t.true((await readFile(raw)).equals(expected), 'qemu-img reads every cluster back');
  });
}

for (const bits of [1, 2]) {
  test(`compressed clusters packed into one host cluster respect ${bits}-bit refcounts`, async (t) => {
    const dir = await tempDir(t);
    const image = path.join(dir, 'narrow.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', `refcount_bits=${bits}`, image, '10M');
    const writes = [1, 2, 3, 4].flatMap((p, i) => ['-c', `write -c -P ${p} ${i * 65536} 64k`]);
    const result = await qcow2Cli('io', ...writes, image);
    t.is(result.code, 0, result.stdout + result.stderr);
    const check = await qemuImg('check', '--output=json', image);
    const report = JSON.parse(check) as { corruptions?: number; leaks?: number; 'compressed-clusters'?: number };
    t.is(report.corruptions ?? 0, 0);
    t.is(report.leaks ?? 0, 0);
    t.is(report['compressed-clusters'], 4);
    const reads = [1, 2, 3, 4].flatMap((p, i) => ['-c', `read -P ${p} ${i * 65536} 64k`]);
    const verified = await qemuIo('-r', ...reads, image);
    t.notRegex(verified, /failed/);
  });
}

test('a write into a cluster discarded just before (no flush between) survives the close, with an external data file', async (t) => {
  const dir = await tempDir(t);
  const image = path.join(dir, 'with-data.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${path.join(dir, 'data.raw')}`, image, '4M');
  await qemuIo('-c', 'write -P 1 0 64k', image);
  const disk = await open(image, { readOnly: false, followFileNames: true });
  await disk.discard(0, 65536);
  await disk.write(Buffer.alloc(4096, 2), 0);
  await disk.close();
  const verified = await qemuIo('-r', '-c', 'read -P 2 0 4k', '-c', 'read -P 0 4k 60k', image);
  t.notRegex(verified, /failed/);
  const report = JSON.parse(await qemuImg('check', '--output=json', image)) as { corruptions?: number; leaks?: number };
  t.is(report.corruptions ?? 0, 0);
  t.is(report.leaks ?? 0, 0);
});

/** A cluster whose raw deflate (qcow2's parameters) is a few bytes short of the cluster size. */
function barelyCompressible(clusterSize: number): Buffer {
  const next = random(7);
  for (let text = 16; text < clusterSize; text += 16) {
    const cluster = Buffer.alloc(clusterSize, 'a');
    for (let i = 0; i < clusterSize - text; i++) cluster[i] = Math.floor(next() * 256);
    const packed = deflateRawSync(cluster, { windowBits: 12, memLevel: 9 }).length;
    if (packed < clusterSize && packed > clusterSize - 512) return cluster;
  }
  throw new Error('no barely compressible cluster found');
}

for (const clusterSize of [512, 65536]) {
  test(`clusters that compress to just under their size are stored compressed, as qemu-io stores them (${clusterSize}-byte clusters)`, async (t) => {
    const dir = await tempDir(t);
    const data = path.join(dir, 'cluster.bin');
    await writeFile(data, clusterSize === 512 ? Buffer.alloc(512, 7) : barelyCompressible(clusterSize));
    const reports: string[] = [];
    for (const [name, run] of [['ours', qcow2Cli], ['qemu', (_io: string, ...args: string[]) => runProgram('qemu-io', args)]] as const) {
      const image = path.join(dir, `${name}.qcow2`);
      await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${clusterSize}`, image, '1M');
      const result = await run('io', '-c', `write -c -s ${data} 0 ${clusterSize}`, image);
      t.is(result.code, 0, result.stderr);
      reports.push(await qemuImg('check', '--output=json', image));
    }
    const [ours, qemu] = reports.map((r) => JSON.parse(r) as { 'compressed-clusters'?: number; 'image-end-offset'?: number });
    t.is(ours['compressed-clusters'], 1);
    t.deepEqual(ours, { ...qemu, filename: (ours as { filename?: string }).filename });
    t.regex(await qemuImg('compare', path.join(dir, 'ours.qcow2'), path.join(dir, 'qemu.qcow2')), /identical/);
  });
}
