/**
 * Write-path regressions found outside the write tests (torture, concurrency proof), each kept
 * as the smallest story that showed it.
 */
import path from 'node:path';

import test from 'ava';

import { open } from '../ts/index.js';
import { qcow2Cli, qemuImg, qemuIo, tempDir } from './helpers/qemu.js';

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
