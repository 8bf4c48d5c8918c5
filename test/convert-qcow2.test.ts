/** `qcow2 convert -O qcow2` against `qemu-img convert -O qcow2`: targets qemu-img reads as the source, checks clean, and as compact. */
import { stat, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { convert } from '../ts/index.js';
import { patternBytes, qcow2Cli, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';

const SIZE = 8 << 20;

/** Text-like bytes: a small alphabet from a pseudo-random walk, which zlib and zstd shrink to about half. */
function compressibleBytes(length: number, seed: number): Buffer {
  const random = patternBytes(length, seed);
  for (let i = 0; i < length; i++) random[i] = 0x61 + (random[i] % 16);
  return random;
}

/** A raw image: 5 MiB of compressible data, a hole, a zero-filled stretch, and a last odd piece. */
async function rawSource(dir: string): Promise<string> {
  const file = path.join(dir, 'source.raw');
  const bytes = Buffer.alloc(SIZE);
  compressibleBytes(5 << 20, 1).copy(bytes, 0);
  compressibleBytes(300 << 10, 2).copy(bytes, SIZE - (300 << 10));
  await writeFile(file, bytes);
  await qemuIo('-f', 'raw', '-c', 'write -z 5M 1M', file);
  return file;
}

/** base.qcow2 ← mid.qcow2 (raw-free chain) ← top.qcow2, with data, zero clusters and a compressed cluster at each level. */
async function chainSource(dir: string): Promise<{ base: string; mid: string; top: string }> {
  const base = path.join(dir, 'base.qcow2');
  const mid = path.join(dir, 'mid.qcow2');
  const top = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', base, `${SIZE}`);
  await qemuIo('-c', 'write -P 1 0 4M', '-c', 'write -P 2 6M 1M', base);
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', mid);
  await qemuIo('-c', 'write -P 3 1M 512k', '-c', 'write -z 2M 256k', '-c', 'write -c -P 4 7M 128k', mid);
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'mid.qcow2', '-F', 'qcow2', top);
  await qemuIo('-c', 'write -P 5 100k 8k', '-c', 'write -z 3M 64k', '-c', 'write -P 6 7M 4k', '-c', 'write -P 0 5M 64k', top);
  return { base, mid, top };
}

/** `qemu-img check` of `file` finds nothing wrong. */
async function assertClean(t: ExecutionContext, file: string, label: string): Promise<void> {
  const r = await runProgram('qemu-img', ['check', '--output=json', file]);
  t.is(r.code, 0, `check of ${label}: ${r.stdout}${r.stderr}`);
  const report = JSON.parse(r.stdout) as Record<string, number>;
  t.is(report.leaks ?? 0, 0, `leaks in ${label}`);
  t.is(report.corruptions ?? 0, 0, `corruptions in ${label}`);
}

/** `qemu-img compare` of the two images says they are identical. */
async function assertSameContent(t: ExecutionContext, a: string, b: string, label: string): Promise<void> {
  const r = await runProgram('qemu-img', ['compare', a, b]);
  t.is(r.code, 0, `compare ${label}: ${r.stdout}${r.stderr}`);
}

/** The qcow2 properties qemu-img reports, which must be those qemu-img convert gives. */
async function properties(file: string): Promise<unknown> {
  const info = JSON.parse(await qemuImg('info', '--output=json', file)) as Record<string, unknown>;
  const specific = (info['format-specific'] as { data: Record<string, unknown> }).data;
  return {
    size: info['virtual-size'],
    clusterSize: info['cluster-size'],
    backing: info['backing-filename'],
    backingFormat: info['backing-filename-format'],
    compression: specific['compression-type'],
    compat: specific.compat,
  };
}

/** Bytes a file occupies on disk: holes the allocator leaves in the file cost nothing. */
async function allocated(file: string): Promise<number> {
  return (await stat(file)).blocks * 512;
}

/** Convert `source` with both tools and `args`; both targets read as the source; returns the space each takes on disk. */
async function convertBoth(t: ExecutionContext, source: string, args: string[]): Promise<{ ours: number; theirs: number }> {
  const dir = path.dirname(source);
  const ours = path.join(dir, 'ours.qcow2');
  const theirs = path.join(dir, 'theirs.qcow2');
  const label = args.join(' ');
  await qemuImg('convert', ...args, '-O', 'qcow2', source, theirs);
  const r = await qcow2Cli('convert', ...args, '-O', 'qcow2', source, ours);
  t.is(r.code, 0, `${label}: ${r.stderr}`);
  t.is(r.stdout + r.stderr, '', `${label} prints nothing`);
  await assertClean(t, ours, label);
  await assertSameContent(t, source, ours, label);
  t.deepEqual(await properties(ours), await properties(theirs), `properties after ${label}`);
  return { ours: await allocated(ours), theirs: await allocated(theirs) };
}

test('raw → qcow2: plain, other cluster sizes, -m and -W, as compact as qemu-img', async (t) => {
  const source = await rawSource(await tempDir(t));
  for (const args of [['-f', 'raw'], ['-f', 'raw', '-o', 'cluster_size=4k'], ['-f', 'raw', '-o', 'cluster_size=2M,compat=0.10'], ['-f', 'raw', '-m', '1'], ['-f', 'raw', '-W', '-m', '16']]) {
    const { ours, theirs } = await convertBoth(t, source, args);
    t.true(ours <= theirs * 1.1 + 65536, `${args.join(' ')}: ${ours} bytes vs qemu-img's ${theirs}`);
  }
});

test('raw → qcow2 -c: zlib and zstd, within 10 % of qemu-img\'s size', async (t) => {
  const source = await rawSource(await tempDir(t));
  for (const args of [['-f', 'raw', '-c'], ['-f', 'raw', '-c', '-o', 'compression_type=zstd'], ['-f', 'raw', '-c', '-W', '-o', 'cluster_size=16k']]) {
    const { ours, theirs } = await convertBoth(t, source, args);
    t.true(ours < SIZE / 2, `${args.join(' ')} compresses: ${ours} bytes`);
    t.true(Math.abs(ours - theirs) <= theirs * 0.1, `${args.join(' ')}: ${ours} bytes vs qemu-img's ${theirs}`);
  }
});

test('qcow2 chain → qcow2: the whole chain flattened, plain and compressed', async (t) => {
  const { top } = await chainSource(await tempDir(t));
  for (const args of [[], ['-c'], ['-o', 'cluster_size=512'], ['-o', 'extended_l2=on,cluster_size=32k']]) {
    const { ours, theirs } = await convertBoth(t, top, args);
    t.true(ours <= theirs * 1.1 + 65536, `${args.join(' ')}: ${ours} bytes vs qemu-img's ${theirs}`);
  }
});

test('-B: only the top layer is written, the rest stays unallocated over the new backing file', async (t) => {
  const { top } = await chainSource(await tempDir(t));
  for (const args of [['-B', 'mid.qcow2', '-F', 'qcow2'], ['-c', '-B', 'mid.qcow2', '-F', 'qcow2'], ['-o', 'backing_file=mid.qcow2,backing_fmt=qcow2']]) {
    const { ours, theirs } = await convertBoth(t, top, args);
    t.true(ours <= theirs * 1.1 + 65536, `${args.join(' ')}: ${ours} bytes vs qemu-img's ${theirs}`);
    const map = JSON.parse(await qemuImg('map', '--output=json', path.join(path.dirname(top), 'ours.qcow2'))) as Array<{ depth: number; length: number; data: boolean }>;
    const own = map.filter((e) => e.depth === 0 && e.data).reduce((sum, e) => sum + e.length, 0);
    t.true(own <= 256 << 10, `${args.join(' ')}: only the top layer's data is in the target (${own} bytes)`);
  }
});

test('-n into an existing qcow2 image, and the library call', async (t) => {
  const dir = await tempDir(t);
  const source = await rawSource(dir);
  const existing = path.join(dir, 'existing.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', existing, `${SIZE}`);
  await qemuIo('-c', 'write -P 9 0 8M', existing);
  const r = await qcow2Cli('convert', '-n', '-f', 'raw', '-O', 'qcow2', source, existing);
  t.is(r.code, 0, r.stderr);
  await assertSameContent(t, source, existing, '-n');
  await assertClean(t, existing, '-n');
  const library = path.join(dir, 'library.qcow2');
  let last = 0;
  await convert(source, library, {
    format: 'raw',
    outputFormat: 'qcow2',
    qcow2: { create: { clusterSize: 8192 }, compress: true },
    onProgress: (done) => (last = done),
  });
  t.is(last, SIZE - (1 << 20), 'progress counts every byte of data');
  await assertSameContent(t, source, library, 'library');
  await assertClean(t, library, 'library');
});

test('bad arguments are refused with qemu-img messages', async (t) => {
  const dir = await tempDir(t);
  const source = await rawSource(dir);
  const target = path.join(dir, 'out.qcow2');
  const cases: Array<[string[], RegExp]> = [
    [['-c', '-O', 'raw', source, target], /^qcow2: Compression not supported for this file format\n$/],
    [['-B', source, '-O', 'qcow2', source, target], /^qcow2: Use of backing file requires explicit backing format\n$/],
    [['-B', source, '-F', 'raw', '-O', 'raw', source, target], /^qcow2: Backing file not supported for file format 'raw'\n$/],
    [['-n', '-o', 'cluster_size=4k', '-O', 'qcow2', source, target], /^qcow2: -o has no effect when skipping image creation\n$/],
    [['-O', 'qcow2', '-o', 'foo=1', source, target], /^qcow2: Invalid parameter 'foo'\n$/],
    [
      ['-O', 'qcow2', '-o', 'cluster_size=3000', source, target],
      /^qcow2: .*out\.qcow2: error while converting qcow2: Cluster size must be a power of two between 512 and 2048k\n$/,
    ],
    [
      ['-O', 'qcow2', '-B', 'missing.qcow2', '-F', 'qcow2', source, target],
      /^qcow2: Could not open '.*out\.qcow2': .*missing\.qcow2.*No such file or directory/,
    ],
  ];
  for (const [args, message] of cases) {
    const ours = await qcow2Cli('convert', ...args);
    const theirs = await runProgram('qemu-img', ['convert', ...args]);
    t.is(ours.code, 1, args.join(' '));
    t.is(theirs.code, 1, `qemu-img ${args.join(' ')}`);
    t.regex(ours.stderr, message);
  }
});
