/** `qcow2 create` against `qemu-img create`: the same Formatting line, errors, exit codes, and images qemu-img reads alike. */
import { stat, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes, create, open } from '../ts/index.js';
import { formattingLine, parseCreateOptions, splitOptionString } from '../ts/tools/qemu-options.js';
import { qemuImg, qemuIo, tempDir } from './helpers/qemu.js';
import { runIn, runTwin, twinDirs } from './helpers/twin.js';

/**
 * `qemu-img info --output=json` of `file`, without what differs between twins made in two
 * folders; qcow2 images are opened without their backing file, which need not exist (-u).
 */
async function infoJson(file: string): Promise<Record<string, unknown>> {
  const spec = file.endsWith('.qcow2')
    ? `json:${JSON.stringify({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: file } })}`
    : file;
  const info = JSON.parse(await qemuImg('info', '--output=json', spec)) as Record<string, unknown>;
  delete info.filename;
  delete info['full-backing-filename'];
  delete info['actual-size'];
  delete info['dirty-flag'];
  return info;
}

/** Run `create ARGS` with both tools; outputs and exit codes must agree, and so must the images made. */
async function createBoth(t: ExecutionContext, dirs: { theirs: string; ours: string }, args: string[]): Promise<void> {
  const { theirs, ours } = await runTwin(dirs, ['create', ...args]);
  const label = args.join(' ');
  t.is(ours.stdout, theirs.stdout, `stdout of ${label}`);
  t.is(ours.stderr, theirs.stderr, `stderr of ${label}`);
  t.is(ours.code, theirs.code, `exit code of ${label}`);
  const file = args.filter((a) => /\.(qcow2|raw)$/.test(a)).pop();
  if (theirs.code !== 0 || file === undefined) return;
  t.deepEqual(await infoJson(path.join(dirs.ours, file)), await infoJson(path.join(dirs.theirs, file)), `info of ${label}`);
  if (file.endsWith('.qcow2')) {
    // qemu-img opens a relative data file name from the current folder.
    const spec = `json:${JSON.stringify({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: file } })}`;
    const result = await runIn(dirs.ours, 'qemu-img', ['check', '--output=json', spec]);
    t.is(result.code, 0, `check after ${label}: ${result.stderr}`);
    const check = JSON.parse(result.stdout) as Record<string, number>;
    t.is(check['check-errors'], 0, `check errors after ${label}`);
    t.is(check.leaks ?? 0, 0, `leaks after ${label}`);
    t.is(check.corruptions ?? 0, 0, `corruptions after ${label}`);
  }
}

/** A qcow2 and a raw base image in both folders, to back new images. */
async function bases(dirs: { theirs: string; ours: string }): Promise<void> {
  for (const dir of [dirs.theirs, dirs.ours]) {
    await qemuImg('create', '-q', '-f', 'qcow2', path.join(dir, 'base.qcow2'), '3M');
    await qemuImg('create', '-q', '-f', 'raw', path.join(dir, 'base.raw'), '5M');
  }
}

test('raw: output, errors and images like qemu-img', async (t) => {
  const dirs = await twinDirs(await tempDir(t));
  const cases = [
    ['-f', 'raw', 'a.raw', '1M'],
    ['a.raw', '1G'],
    ['-f', 'raw', 'a.raw', '1000'],
    ['-f', 'raw', 'a.raw', '1.5k'],
    ['-f', 'raw', 'a.raw', '0x10'],
    ['-f', 'raw', '-o', 'preallocation=falloc', 'a.raw', '1M'],
    ['-f', 'raw', '-o', 'preallocation=full', 'a.raw', '1M'],
    ['-f', 'raw', '-o', 'preallocation=full', '-o', 'preallocation=off', 'a.raw', '1M'],
    ['-f', 'raw', '-o', 'size=1M,size=2M', 'a.raw'],
    ['-q', '-f', 'raw', 'a.raw', '1M'],
    ['-f', 'raw', '-o', 'preallocation=metadata', 'a.raw', '1M'],
    ['-f', 'raw', '-o', 'preallocation=xx', 'a.raw', '1M'],
    ['-f', 'raw', '-o', 'cluster_size=4k', 'a.raw', '1M'],
    ['-f', 'raw', '-b', 'base.raw', '-F', 'raw', 'a.raw', '1M'],
    ['-f', 'raw', '-o', 'size=1M', 'a.raw', '1M'],
    ['-f', 'raw', 'a.raw', '1X'],
    ['-f', 'raw', 'a.raw', '99999999999999999999'],
    ['-f', 'raw', 'a.raw'],
    ['-f', 'raw'],
    ['-f', 'raw', 'a.raw', '1M', 'extra'],
    ['-f', 'foo', 'a.raw', '1M'],
    ['-f', 'raw', '-o', 'help'],
    ['-f', 'raw', '/nonexistent-dir/a.raw', '1M'],
  ];
  for (const args of cases) await createBoth(t, dirs, args);
});

test('raw: preallocation reserves the blocks, and an existing file is emptied', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.raw');
  await writeFile(file, Buffer.alloc(1 << 20, 7));
  await create(file, { format: 'raw', size: 1000 });
  t.is((await stat(file)).size, 1024, 'rounded up to 512 like qemu-img');
  const image = await open(file, { format: 'raw', readOnly: true });
  const buffer = Buffer.alloc(1024, 1);
  await image.read(buffer, 0);
  await image.close();
  t.true(buffer.equals(Buffer.alloc(1024)), 'the old bytes are gone');
  for (const preallocation of ['falloc', 'full'] as const) {
    await create(file, { format: 'raw', size: 4 << 20, preallocation });
    t.true((await stat(file)).blocks * 512 >= 4 << 20, `${preallocation} allocates every block`);
  }
  await t.throwsAsync(create(file, { format: 'raw', size: 1 << 20, clusterSize: 4096 }), { code: ErrorCodes.INVALID_ARGUMENT });
  await t.throwsAsync(create(file, { format: 'raw' }), { message: 'Image creation needs a size parameter' });
  await t.throwsAsync(create(file, { format: 'raw', size: -1 }), { code: ErrorCodes.INVALID_ARGUMENT });
});

test('qcow2: every option, and bad combinations, like qemu-img', async (t) => {
  const dirs = await twinDirs(await tempDir(t));
  await bases(dirs);
  const cases = [
    ['-f', 'qcow2', 'a.qcow2', '1G'],
    ['-f', 'qcow2', 'a.qcow2', '1000'],
    ['-f', 'qcow2', '-o', 'compat=0.10', 'a.qcow2', '64M'],
    ['-f', 'qcow2', '-o', 'compat=v2', 'a.qcow2', '64M'],
    ['-f', 'qcow2', '-o', 'compat=v3', 'a.qcow2', '64M'],
    ['-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=1', 'a.qcow2', '8M'],
    ['-f', 'qcow2', '-o', 'cluster_size=4k,refcount_bits=64', 'a.qcow2', '8M'],
    ['-f', 'qcow2', '-o', 'cluster_size=2M,refcount_bits=8,lazy_refcounts=on', 'a.qcow2', '1T'],
    ['-f', 'qcow2', '-o', 'extended_l2=on,compression_type=zstd', 'a.qcow2', '100M'],
    ['-f', 'qcow2', '-o', 'preallocation=metadata', 'a.qcow2', '20M'],
    ['-f', 'qcow2', '-o', 'preallocation=falloc', 'a.qcow2', '20M'],
    ['-f', 'qcow2', '-o', 'preallocation=full,cluster_size=16k', 'a.qcow2', '5M'],
    ['-f', 'qcow2', '-o', 'data_file=a.data', 'a.qcow2', '4M'],
    ['-f', 'qcow2', '-o', 'data_file=a.data,data_file_raw=on,preallocation=full', 'a.qcow2', '4M'],
    ['-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'a.qcow2'],
    ['-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'a.qcow2', '7M'],
    ['-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'a.qcow2'],
    ['-f', 'qcow2', '-o', 'backing_file=base.qcow2,backing_fmt=qcow2,extended_l2=on,preallocation=metadata', 'a.qcow2'],
    ['-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', 'a.qcow2', '1G'],
    ['-f', 'qcow2', '-o', 'lazy_refcounts=true', 'a.qcow2', '1M'],
    ['-q', '-f', 'qcow2', 'a.qcow2', '1M'],
    // refused before the Formatting line
    ['-f', 'qcow2', '-o', 'foo=bar', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'lazy_refcounts=maybe', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'refcount_bits=abc', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'cluster_size=abc', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-b', 'missing.qcow2', '-F', 'qcow2', 'a.qcow2'],
    ['-f', 'qcow2', '-b', 'missing.qcow2', '-F', 'qcow2', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', 'a.qcow2'],
    ['-f', 'qcow2', '-b', 'base.qcow2', 'a.qcow2'],
    ['-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', 'a.qcow2', '1M'],
    ['-f', 'qcow2', 'a.qcow2'],
    ['-f', 'qcow2', '-o', 'size=1M', 'a.qcow2', '2M'],
    // refused by the driver, after the Formatting line
    ['-f', 'qcow2', '-o', 'compat=2', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'preallocation=xx', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'compression_type=lz4', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'cluster_size=3000', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'cluster_size=256', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'cluster_size=4M', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'refcount_bits=3', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'refcount_bits=128', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'compat=0.10,refcount_bits=8', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'compat=0.10,lazy_refcounts=on', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'compat=0.10,extended_l2=on', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'compat=0.10,compression_type=zstd', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'compat=0.10,data_file=x.data', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'cluster_size=1k,extended_l2=on', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'data_file_raw=on', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-F', 'qcow2', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'backing_file=base.qcow2,backing_fmt=qcow2,preallocation=full', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '-o', 'data_file=d,data_file_raw=on,backing_file=base.qcow2,backing_fmt=qcow2', 'a.qcow2', '1M'],
    ['-f', 'qcow2', '/nonexistent-dir/a.qcow2', '1M'],
  ];
  for (const args of cases) await createBoth(t, dirs, args);
});

test('qcow2: the new image takes writes that qemu-io reads back, over its backing file', async (t) => {
  const dir = await tempDir(t);
  const base = path.join(dir, 'base.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', base, '4M');
  await qemuIo('-c', 'write -P 5 0 4M', base);
  const top = path.join(dir, 'top.qcow2');
  await create(top, { backingFile: 'base.qcow2', backingFormat: 'qcow2', clusterSize: 4096 });
  const image = await open(top, { followFileNames: true });
  t.is(image.size, 4 << 20, 'size taken from the backing file');
  await image.write(Buffer.alloc(1000, 9), 6000);
  await image.close();
  await qemuIo('-c', 'read -P 5 0 6000', '-c', 'read -P 9 6000 1000', '-c', 'read -P 5 7000 4187304', top);
  t.regex(await qemuImg('check', top), /No errors were found/);
});

test('library: a missing backing file and unknown options fail with clear errors', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.qcow2');
  await t.throwsAsync(create(file, { backingFile: 'missing.qcow2', backingFormat: 'qcow2' }), {
    code: 'ENOENT',
    message: /Could not open '.*missing\.qcow2': No such file or directory/,
  });
  await t.throwsAsync(create(file, { size: 1 << 20, clusterSize: 1000 }), { message: /Cluster size must be a power of two/ });
  await t.throwsAsync(create(file, { size: 2 ** 60 }), { code: ErrorCodes.INVALID_ARGUMENT });
});

test('-o syntax: doubled commas, later values winning, and the Formatting line order', (t) => {
  t.deepEqual(splitOptionString('a=1,,2,b=3,'), ['a=1,2', 'b=3']);
  const values = parseCreateOptions('qcow2', ['cluster_size=4k,compat=v2', 'cluster_size=8k', 'backing_file=x,,y']);
  t.is(
    formattingLine('f.qcow2', 'qcow2', values.set('size', '1M')),
    "Formatting 'f.qcow2', fmt=qcow2 cluster_size=8192 extended_l2=off compression_type=zlib size=1048576 compat=v2 " +
      'backing_file=x,y lazy_refcounts=off refcount_bits=16',
  );
  t.throws(() => parseCreateOptions('qcow2', ['cluster_size=1Q']), { message: /expects a non-negative number below 2\^64/ });
  t.throws(() => parseCreateOptions('raw', ['compat=1.1']), { message: "Invalid parameter 'compat'" });
});
