/**
 * Write-path regressions found outside the write tests (torture, concurrency proof), each kept
 * as the smallest story that showed it.
 */
import path from 'node:path';

import test from 'ava';

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
