/** `qcow2 measure` against `qemu-img measure`: the same figures, messages and exit codes, from sizes and from images. */
import { stat } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes, create, measure, open, refcountMetadataSize } from '../ts/index.js';
import { qemuImg, qemuIo, tempDir } from './helpers/qemu.js';
import { runTwin } from './helpers/twin.js';

/** Run `measure ARGS` with both tools in `dir`; stdout, stderr and exit code must agree byte for byte. */
async function measureBoth(t: ExecutionContext, dir: string, args: string[]): Promise<void> {
  const { theirs, ours } = await runTwin({ theirs: dir, ours: dir }, ['measure', ...args]);
  const label = `measure ${args.join(' ')}`;
  t.is(ours.stdout, theirs.stdout, `stdout of ${label}`);
  t.is(ours.stderr, theirs.stderr, `stderr of ${label}`);
  t.is(ours.code, theirs.code, `exit code of ${label}`);
}

/** Run every case, a few at a time (each case starts two processes). */
async function measureAll(t: ExecutionContext, dir: string, cases: string[][]): Promise<void> {
  const queue = [...cases];
  const worker = async () => {
    for (let args = queue.shift(); args; args = queue.shift()) await measureBoth(t, dir, args);
  };
  await Promise.all([worker(), worker(), worker()]);
}

test('from a size: raw and qcow2 figures for odd and very large sizes, every cluster size and refcount width', async (t) => {
  const dir = await tempDir(t);
  const cases: string[][] = [];
  for (const size of ['0', '1', '511', '512', '1000', '65535', '65536', '65537', '123456789', '1G', '1T', '0x10k', '1.5M', '0.3k', ' 7']) {
    cases.push(['--size', size], ['-O', 'qcow2', '--size', size], ['--output=json', '-O', 'qcow2', '--size', size]);
  }
  for (const clusterSize of ['512', '1k', '4k', '64k', '256k', '2M']) {
    for (const bits of ['1', '2', '8', '16', '32', '64']) {
      cases.push(['-O', 'qcow2', '-o', `cluster_size=${clusterSize},refcount_bits=${bits}`, '--size', '100000000']);
    }
    cases.push(['-O', 'qcow2', '-o', `cluster_size=${clusterSize}`, '--size', '3T']);
  }
  cases.push(
    ['-O', 'qcow2', '-o', 'cluster_size=2M', '--size', '1E'],
    ['-O', 'qcow2', '-o', 'cluster_size=2M,extended_l2=on', '--size', '1E'],
    ['-O', 'qcow2', '-o', 'cluster_size=2M', '--size', '2305843009213693952'],
    ['-O', 'qcow2', '-o', 'cluster_size=2M', '--size', '4E'],
    ['-O', 'qcow2', '--size', '2P'],
    ['-O', 'qcow2', '--size', '8E'],
    ['-O', 'qcow2', '--size', '7.99E'],
    ['--output=json', '-O', 'raw', '--size', '1E'],
  );
  await measureAll(t, dir, cases);
});

test('from a size: creation options that change the figures, and those that do not', async (t) => {
  const dir = await tempDir(t);
  const q = (options: string, size = '5G') => ['-O', 'qcow2', '-o', options, '--size', size];
  await measureAll(t, dir, [
    q('extended_l2=on'),
    q('extended_l2=on,cluster_size=16k'),
    q('extended_l2=on,cluster_size=2M', '123456789'),
    q('extended_l2'),
    q('preallocation=off'),
    q('preallocation=metadata'),
    q('preallocation=falloc'),
    q('preallocation=full', '1000'),
    q('compat=0.10'),
    q('compat=1.1,refcount_bits=1'),
    q('lazy_refcounts=on,compat=0.10'),
    q('data_file=x.raw,data_file_raw=on'),
    q('backing_file=nothing.qcow2,backing_fmt=qcow2'),
    q('compression_type=zstd,nocow=on,extent_size_hint=1M'),
    q('size=1T'),
    q('cluster_size=4k,,cluster_size=8k'),
    q('cluster_size=4k', '1G').concat(['-o', 'cluster_size=128k']),
    ['-O', 'raw', '-o', 'preallocation=full,nocow=on', '--size', '1G'],
    ['-O', 'raw', '-o', 'preallocation=nonsense', '--size', '1G'],
    ['--output=human', '--output=json', '-O', 'qcow2', '--size', '1G'],
    ['--size', '1G', '--size', '2G'],
  ]);
});

test('bad options and arguments: the same messages and exit codes as qemu-img measure', async (t) => {
  const dir = await tempDir(t);
  const q = (options: string) => ['-O', 'qcow2', '-o', options, '--size', '1G'];
  await measureAll(t, dir, [
    [],
    ['--size', 'abc'],
    ['--size', '-1'],
    ['--size', '1.5'],
    ['--size', '9E'],
    ['--size', '18446744073709551616'],
    ['--size', '1k', 'file'],
    ['a', 'b'],
    ['-f', 'qcow2', '--size', '1G'],
    ['-l', 'snap', '--size', '1G'],
    ['--output=xml', '--size', '1G'],
    ['-O', 'vmdk', '--size', '1G'],
    ['-O', 'null-co', '--size', '1G'],
    ['-O', 'nonsense', '--size', '1G'],
    ['-o', '', '--size', '1G'],
    ['-o', ',', '--size', '1G'],
    ['-o', 'cluster_size=4k,', '--size', '1G'],
    ['-O', 'raw', '-o', 'cluster_size=4k', '--size', '1G'],
    q('foo=1'),
    q('help'),
    q('cluster_size=1000'),
    q('cluster_size=4M'),
    q('cluster_size=abc'),
    q('compat=v3'),
    q('compat=1.2'),
    q('refcount_bits=3'),
    q('refcount_bits=128'),
    q('refcount_bits=x'),
    q('refcount_bits=8,compat=0.10'),
    q('preallocation=foo'),
    q('extended_l2=maybe'),
    q('extended_l2=on,cluster_size=4k'),
    q('encrypt.format=luks'),
    ['-O', 'qcow2', '-o', 'cluster_size=512', '--size', '1P'],
    ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=16k', '--size', '1P'],
    ['missing.qcow2'],
    ['.'],
    ['-f', 'nonsense', 'missing.qcow2'],
  ]);
});

test('a bad option makes getopt complain on stderr and qemu-img exit 0, as it shows its help', async (t) => {
  const dir = await tempDir(t);
  for (const args of [['-x'], ['--size'], ['--nonsense', '--size', '1G'], ['-f']]) {
    const { theirs, ours } = await runTwin({ theirs: dir, ours: dir }, ['measure', ...args]);
    t.is(ours.stderr, theirs.stderr, args.join(' '));
    t.is(ours.code, theirs.code, args.join(' '));
    t.regex(ours.stdout, /^usage: qcow2 measure/);
  }
});

/** Images with data, zero and unallocated ranges, a backing chain, raw files with holes, snapshots and bitmaps. */
async function makeImages(dir: string): Promise<void> {
  const at = (name: string) => path.join(dir, name);
  await qemuImg('create', '-q', '-f', 'qcow2', at('plain.qcow2'), '1G');
  await qemuIo('-c', 'write -P 1 0 1M', '-c', 'write -z 10M 1M', '-c', 'write -P 2 300M 1000', '-c', 'write -c -P 3 500M 128k', at('plain.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', at('odd.qcow2'), '1234567');
  await qemuIo('-c', 'write -P 4 1233920 512', '-c', 'write -P 5 4096 512', at('odd.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', at('v2.qcow2'), '100M');
  await qemuIo('-c', 'write -P 6 5M 3M', at('v2.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', at('ext.qcow2'), '5G');
  await qemuIo('-c', 'write -P 7 4k 4k', '-c', 'write -z 1M 4k', '-c', 'write -P 8 2M 128k', '-c', 'write -P 9 3000k 1k', at('ext.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', at('base.qcow2'), '100M');
  await qemuIo('-c', 'write -P 10 0 2M', '-c', 'write -P 11 10M 100k', '-c', 'write -P 12 90M 64k', at('base.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', at('overlay.qcow2'), '120M');
  await qemuIo('-c', 'write -P 13 1M 2M', '-c', 'write -z 10M 64k', '-c', 'write -z 90M 64k', '-c', 'write -P 14 110M 1k', at('overlay.qcow2'));
  await qemuImg('create', '-q', '-f', 'raw', at('rawbase.raw'), '50M');
  await qemuIo('-f', 'raw', '-c', 'write -P 15 7M 300k', at('rawbase.raw'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'rawbase.raw', '-F', 'raw', '-o', 'cluster_size=32k', at('onraw.qcow2'), '60M');
  await qemuIo('-c', 'write -P 16 55M 4k', at('onraw.qcow2'));
  await qemuImg('create', '-q', '-f', 'raw', at('holes.raw'), '1000000');
  await qemuIo('-f', 'raw', '-c', 'write -P 17 102400 3072', '-c', 'write -P 18 600000 100000', at('holes.raw'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', at('premeta.qcow2'), '30M');
  await qemuIo('-c', 'write -P 19 1M 1M', at('premeta.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'preallocation=falloc,cluster_size=16k', at('prefalloc.qcow2'), '10M');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${at('data.raw')}`, at('datafile.qcow2'), '20M');
  await qemuIo('-c', 'write -P 20 1M 1M', at('datafile.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', at('snap.qcow2'), '10M');
  await qemuIo('-c', 'write -P 21 0 1M', at('snap.qcow2'));
  await qemuImg('snapshot', '-c', 'first', at('snap.qcow2'));
  await qemuImg('resize', '-q', at('snap.qcow2'), '100M');
  await qemuIo('-c', 'write -P 22 20M 3M', at('snap.qcow2'));
  await qemuImg('snapshot', '-c', 'second', at('snap.qcow2'));
  await qemuIo('-c', 'write -P 23 50M 1M', at('snap.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', at('bitmaps.qcow2'), '3G');
  await qemuIo('-c', 'write -P 24 0 1M', at('bitmaps.qcow2'));
  await qemuImg('bitmap', '--add', at('bitmaps.qcow2'), 'b1');
  await qemuImg('bitmap', '--add', '-g', '512', at('bitmaps.qcow2'), 'a-much-longer-bitmap-name-than-the-first-one');
  await qemuImg('bitmap', '--add', '-g', '2M', '--disable', at('bitmaps.qcow2'), 'b3');
}

test('from images: data, zero and unallocated ranges, backing chains, raw files, preallocation, snapshots, bitmaps', async (t) => {
  const dir = await tempDir(t);
  await makeImages(dir);
  const images = [
    'plain.qcow2', 'odd.qcow2', 'v2.qcow2', 'ext.qcow2', 'overlay.qcow2', 'onraw.qcow2', 'holes.raw',
    'premeta.qcow2', 'prefalloc.qcow2', 'datafile.qcow2', 'snap.qcow2', 'bitmaps.qcow2',
  ];
  const cases: string[][] = [];
  for (const image of images) {
    cases.push([image], ['-O', 'qcow2', image], ['--output=json', '-O', 'qcow2', '-U', image]);
  }
  for (const options of ['cluster_size=512', 'cluster_size=2M,refcount_bits=1', 'extended_l2=on', 'compat=0.10', 'preallocation=full']) {
    for (const image of ['plain.qcow2', 'overlay.qcow2', 'holes.raw', 'bitmaps.qcow2', 'odd.qcow2']) {
      cases.push(['--output=json', '-O', 'qcow2', '-o', options, image]);
    }
  }
  cases.push(
    ['-O', 'qcow2', '-o', 'backing_file=base.qcow2', 'overlay.qcow2'],
    ['-O', 'qcow2', '-o', 'size=1P', 'plain.qcow2'],
    ['-O', 'qcow2', '-o', 'size=1P,cluster_size=512', 'plain.qcow2'],
    ['-O', 'qcow2', '-f', 'raw', 'plain.qcow2'],
    ['-O', 'qcow2', '-f', 'qcow2', 'holes.raw'],
    ['-O', 'qcow2', '-l', 'first', 'snap.qcow2'],
    ['-O', 'qcow2', '-l', '2', 'snap.qcow2'],
    ['--output=json', '-O', 'qcow2', '-l', 'snapshot.name=second', 'snap.qcow2'],
    ['-O', 'qcow2', '-l', 'snapshot.id=1', 'snap.qcow2'],
    ['-O', 'qcow2', '-l', 'snapshot.id=1,snapshot.name=first', 'snap.qcow2'],
    ['-O', 'qcow2', '-l', 'snapshot.id=2,snapshot.name=first', 'snap.qcow2'],
    ['-O', 'qcow2', '-l', 'nosuch', 'snap.qcow2'],
    ['-O', 'qcow2', '-l', 'snapshot.foo=1', 'snap.qcow2'],
    ['-O', 'raw', '-l', 'first', 'snap.qcow2'],
    ['-l', 'first', 'holes.raw'],
  );
  await measureAll(t, dir, cases);
});

test('library: bigint figures, qemu-style refusals with codes, and the source image measured in place', async (t) => {
  const dir = await tempDir(t);
  t.deepEqual(await measure(undefined, { outputFormat: 'qcow2', size: 1 << 30 }), { required: 393216n, fullyAllocated: 1074135040n });
  t.deepEqual(await measure(undefined, { size: 1000 }), { required: 1024n, fullyAllocated: 1024n });
  const huge = await measure(undefined, { outputFormat: 'qcow2', clusterSize: 2 << 20, size: 1n << 60n });
  t.is(huge.fullyAllocated, 1152927002196443136n);
  t.is(refcountMetadataSize(16385n, 65536n, 16n), 131072n);
  const bad = await t.throwsAsync(measure(undefined, { outputFormat: 'qcow2', size: 1, clusterSize: 3000 }));
  t.is((bad as { code?: string }).code, ErrorCodes.INVALID_ARGUMENT);
  t.regex(bad!.message, /^Cluster size must be a power of two between 512 and 2048k$/);
  await t.throwsAsync(measure(undefined, { size: -1 }), { code: ErrorCodes.INVALID_ARGUMENT });
  await t.throwsAsync(measure(undefined, { size: 2n ** 63n }), { code: ErrorCodes.INVALID_ARGUMENT });
  const file = path.join(dir, 'x.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', file, '64M');
  await qemuIo('-c', 'write -P 1 100k 1k', file);
  const image = await open(file, { readOnly: true });
  try {
    t.deepEqual(await measure(image, { outputFormat: 'qcow2' }), { required: 393216n, fullyAllocated: 67436544n, bitmaps: 0n });
  } finally {
    await image.close();
  }
});

test('what our create makes with preallocation=metadata or full is as large as the fully allocated figure', async (t) => {
  const dir = await tempDir(t);
  const layouts = [
    {},
    { clusterSize: 4096, refcountBits: 64 },
    { clusterSize: 512, refcountBits: 1 },
    { clusterSize: 2 << 20, extendedL2: true },
    { clusterSize: 16384, extendedL2: true, refcountBits: 8 },
  ];
  for (const [i, layout] of layouts.entries()) {
    for (const preallocation of ['metadata', 'full'] as const) {
      const file = path.join(dir, `p${i}-${preallocation}.qcow2`);
      const size = 100_000_000 + i * 12345;
      await create(file, { format: 'qcow2', size, preallocation, ...layout });
      const figures = await measure(undefined, { outputFormat: 'qcow2', size, preallocation, ...layout });
      t.is(BigInt((await stat(file)).size), figures.fullyAllocated, `${JSON.stringify(layout)} ${preallocation}`);
    }
  }
});
