/** `qcow2 bench` against `qemu-img bench`: the same request sequence, the same output lines and exit codes. */
import { copyFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { open } from '../ts/index.js';
import { bench, nextBenchOffset } from '../ts/tools/bench.js';
import { qcow2Cli, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';

/** The run time differs from run to run. */
function maskRunTime(text: string): string {
  return text.replace(/^Run completed in \d+\.\d{3} seconds\.$/m, 'Run completed in TIME seconds.');
}

/** Twin copies of a fresh raw image of `size`. */
async function rawTwins(t: ExecutionContext, size: string): Promise<[string, string]> {
  const dir = await tempDir(t);
  const a = path.join(dir, 'a.raw');
  const b = path.join(dir, 'b.raw');
  await qemuImg('create', '-f', 'raw', a, size);
  await copyFile(a, b);
  return [a, b];
}

/** Run both benches with `args`; assert the same masked stdout, stderr (prefix aside) and exit code. */
async function sameBench(t: ExecutionContext, a: string, b: string, args: string[]): Promise<void> {
  const theirs = await runProgram('qemu-img', ['bench', ...args, a]);
  const ours = await qcow2Cli('bench', ...args, b);
  t.is(maskRunTime(ours.stdout), maskRunTime(theirs.stdout), args.join(' '));
  t.is(ours.stderr.replace(/^qcow2: /gm, '').replaceAll(b, a), theirs.stderr.replace(/^qemu-img: /gm, ''), args.join(' '));
  t.is(ours.code, theirs.code, args.join(' '));
}

async function assertSameImages(t: ExecutionContext, a: string, b: string): Promise<void> {
  const r = await runProgram('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b]);
  t.is(r.code, 0, `qemu-img compare: ${r.stdout}${r.stderr}`);
}

test('write benches hit the same offsets as qemu-img bench, wrapping at the end of the disk', async (t) => {
  const [a, b] = await rawTwins(t, '1M');
  await sameBench(t, a, b, ['-f', 'raw', '-w', '-c', '10', '-d', '3', '-s', '4k', '-S', '300k', '-o', '4k', '--pattern=7']);
  await sameBench(t, a, b, ['-f', 'raw', '-w', '-c', '3', '-d', '1', '-s', '4k', '-S', '2500k', '-o', '8k', '--pattern=0x21']);
  await sameBench(t, a, b, ['-f', 'raw', '-w', '-c', '7', '-d', '2', '-s', '1536', '-S', '0', '-o', '500k', '--pattern=9', '--flush-interval=2']);
  await sameBench(t, a, b, ['-f', 'raw', '-w', '-c', '9', '-d', '2', '-s', '1k', '-o', '700k', '--pattern=10', '--flush-interval=3', '--no-drain']);
  await sameBench(t, a, b, ['-f', 'raw', '-w', '-c', '7', '-s', '1536', '--flush-interval=2']);
  await assertSameImages(t, a, b);
});

test('qcow2 write benches: the same offsets written as qemu-img bench, and a clean image', async (t) => {
  const dir = await tempDir(t);
  const a = path.join(dir, 'a.qcow2');
  const b = path.join(dir, 'b.qcow2');
  await qemuImg('create', '-f', 'qcow2', a, '4M');
  await copyFile(a, b);
  await sameBench(t, a, b, ['-f', 'qcow2', '-w', '-c', '40', '-d', '4', '-s', '4k', '-S', '200k', '-o', '1k', '--pattern=3']);
  await sameBench(t, a, b, ['-w', '-c', '12', '-d', '4', '-s', '64k', '-o', '3M', '--pattern=4', '--flush-interval=4']);
  const r = await runProgram('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', a, b]);
  t.is(r.code, 0, r.stdout + r.stderr);
  const check = await runProgram('qemu-img', ['check', b]);
  t.is(check.code, 0, check.stdout + check.stderr);
});

test('the library runs exactly COUNT requests at offset, offset+step, … modulo the disk size', async (t) => {
  const [file] = await rawTwins(t, '1M');
  const image = await open(file, { format: 'raw' });
  try {
    const offsets: number[] = [];
    const result = await bench(image, { count: 9, depth: 4, size: 4096, step: 300 << 10, offset: 500 << 10, write: true, pattern: 5, onRequest: (o) => offsets.push(o) });
    t.is(result.requests, 9);
    const expected = [500 << 10];
    while (expected.length < 9) expected.push(nextBenchOffset(expected[expected.length - 1], 300 << 10, 1 << 20));
    t.deepEqual(offsets, expected);
    t.deepEqual(expected.slice(0, 4), [512000, 819200, 77824, 385024]);
    const flushed = await bench(image, { count: 12, depth: 2, size: 512, write: true, flushInterval: 4 });
    t.is(flushed.requests, 12);
    t.is(flushed.flushes, 2);
    const undrained = await bench(image, { count: 12, depth: 2, size: 512, write: true, flushInterval: 4, drain: false });
    t.is(undrained.flushes, 2);
  } finally {
    await image.close();
  }
  await qemuIo('-r', '-f', 'raw', '-c', 'read -P 5 500k 4k', '-c', 'read -P 5 76k 4k', '-c', 'read -P 0 600k 4k', file);
});

test('read benches on raw and qcow2 images print the same lines', async (t) => {
  const [a, b] = await rawTwins(t, '2M');
  await sameBench(t, a, b, ['-f', 'raw', '-c', '100', '-d', '8', '-s', '8k']);
  await sameBench(t, a, b, ['-c', '0']);
  await sameBench(t, a, b, ['-c', '3', '-w', '-s', '512', '--pattern=0x51']);
  await sameBench(t, a, b, ['-f', 'raw', '-c', '20', '-d', '1', '-s', '1.5k', '-S', '0x10', '-o', '0x200', '-i', 'threads']);
  await sameBench(t, a, b, ['-f', 'raw', '-c', '5', '-s', '0', '-q', '-n', '-t', 'none', '-U']);
  const qcow2 = path.join(path.dirname(a), 'disk.qcow2');
  await qemuImg('create', '-f', 'qcow2', qcow2, '8M');
  await qemuIo('-f', 'qcow2', '-c', 'write -P 3 0 1M', '-c', 'write -c -P 4 4M 1M', qcow2);
  await sameBench(t, qcow2, qcow2, ['-c', '1000', '-s', '4k', '-S', '12k', '-o', '512']);
  await sameBench(t, qcow2, qcow2, ['-f', 'qcow2', '-c', '50', '-d', '1', '-s', '64k', '-o', '4M']);
});

test('a request past the end fails the run with "Failed request" and exit code 1', async (t) => {
  const [a, b] = await rawTwins(t, '1M');
  await sameBench(t, a, b, ['-f', 'raw', '-c', '3', '-o', '1M']);
  await sameBench(t, a, b, ['-f', 'raw', '-c', '3', '-s', '4k', '-S', '1022k', '-d', '1', '-w']);
  await assertSameImages(t, a, b);
});

test('bad options are refused with qemu-img bench\'s messages', async (t) => {
  const [a, b] = await rawTwins(t, '1M');
  const cases = [
    ['-c', 'x'],
    ['-c', '-1'],
    ['-d', 'x'],
    ['--pattern=256', '-w'],
    ['--pattern=x', '-w'],
    ['--flush-interval=x', '-w'],
    ['--flush-interval=3'],
    ['-w', '-d', '4', '--flush-interval=2', '--no-drain'],
    ['-t', 'bad'],
    ['-i', 'bogus'],
    ['-c', '1', '-o', '1.5'],
  ];
  for (const args of cases) await sameBench(t, a, b, ['-f', 'raw', ...args]);
  for (const args of [['-s', 'x'], ['-s', '3G'], ['-o', 'x'], []]) {
    const ours = await qcow2Cli('bench', ...args, ...(args.length ? [b] : []));
    const theirs = await runProgram('qemu-img', ['bench', ...args, ...(args.length ? [a] : [])]);
    t.is(ours.code, 1, args.join(' '));
    t.is(theirs.code, 1, args.join(' '));
    t.is(ours.stderr.split('\n')[0].replace(/^qcow2: /, ''), theirs.stderr.split('\n')[0].replace(/^qemu-img: /, ''));
  }
});
