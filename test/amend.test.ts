/** `qcow2 amend` against `qemu-img amend` on twin images: the same output, exit codes, headers, contents and allocation. */
import { copyFile, readFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes, amend, readHeader } from '../ts/index.js';
import { headerFacts, mapShape, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';
import { runTwin, twinDirs } from './helpers/twin.js';

type Dirs = { theirs: string; ours: string };

/** The images both folders start with: version 2 and 3 images with data and zero clusters, an overlay, a data-file image. */
async function makeImages(dir: string): Promise<void> {
  const at = (name: string) => path.join(dir, name);
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', at('v2.qcow2'), '4M');
  await qemuIo('-c', 'write -P 1 0 64k', '-c', 'write -P 2 3M 4k', at('v2.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', at('v3.qcow2'), '4M');
  await qemuIo('-c', 'write -P 1 0 64k', '-c', 'write -z 1M 128k', '-c', 'write -P 3 2M 64k', '-c', 'write -z 2M 64k', at('v3.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'v3.qcow2', '-F', 'qcow2', at('ov.qcow2'));
  await qemuIo('-c', 'write -z 0 64k', '-c', 'write -P 4 64k 64k', '-c', 'write -z 2M 192k', at('ov.qcow2'));
  // qemu looks a relative data file name up from its working folder.
  const created = await runProgram('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'data_file=df.raw,data_file_raw=on', 'df.qcow2', '1M'], { cwd: dir });
  const written = await runProgram('qemu-io', ['-c', 'write -P 5 0 64k', 'df.qcow2'], { cwd: dir });
  if (created.code !== 0 || written.code !== 0) throw new Error(created.stderr + written.stderr);
}

async function twinImages(t: ExecutionContext): Promise<Dirs> {
  const dirs = await twinDirs(await tempDir(t));
  await Promise.all([makeImages(dirs.theirs), makeImages(dirs.ours)]);
  return dirs;
}

/** Run `amend ARGS` with both tools; outputs, exit codes, and the header, content and allocation of `image` must agree. */
async function amendBoth(t: ExecutionContext, dirs: Dirs, args: string[], image: string, compareStderr = true): Promise<void> {
  const label = args.join(' ');
  const { theirs, ours } = await runTwin(dirs, ['amend', ...args]);
  t.is(ours.stdout, theirs.stdout, `stdout of ${label}`);
  // qemu lists the refcount repairs of a dirty image it opens; this package repairs it silently.
  if (compareStderr) t.is(ours.stderr, theirs.stderr.replace("'qemu-img rebase'", "'qcow2 rebase'"), `stderr of ${label}`);
  t.is(ours.code, theirs.code, `exit code of ${label}`);
  const [a, b] = [path.join(dirs.ours, image), path.join(dirs.theirs, image)];
  t.deepEqual(await headerFacts(a), await headerFacts(b), `header after ${label}`);
  if (image === 'df.qcow2') return;
  t.regex(await qemuImg('compare', a, b), /Images are identical/, `content after ${label}`);
  t.is(await mapShape(a), await mapShape(b), `allocation after ${label}`);
  t.regex(await qemuImg('check', a), /No errors were found/, `check after ${label}`);
}

const headerCluster = async (dir: string, name: string) => (await readFile(path.join(dir, name))).subarray(0, 65536);

test('compat: upgrade writes qemu-img\'s header, downgrade expands zero clusters as qemu-img does', async (t) => {
  const dirs = await twinImages(t);
  await amendBoth(t, dirs, ['-o', 'compat=1.1', 'v2.qcow2'], 'v2.qcow2');
  t.true((await headerCluster(dirs.ours, 'v2.qcow2')).equals(await headerCluster(dirs.theirs, 'v2.qcow2')), 'header cluster byte for byte');
  await amendBoth(t, dirs, ['-o', 'compat=0.10', 'v2.qcow2'], 'v2.qcow2');
  t.true((await headerCluster(dirs.ours, 'v2.qcow2')).equals(await headerCluster(dirs.theirs, 'v2.qcow2')));
  await amendBoth(t, dirs, ['-o', 'compat=0.10', 'ov.qcow2'], 'ov.qcow2');
  await amendBoth(t, dirs, ['-o', 'compat=v2', 'v3.qcow2'], 'v3.qcow2');
  await amendBoth(t, dirs, ['-q', '-o', 'compat=v3,lazy_refcounts=on', 'v3.qcow2'], 'v3.qcow2');
  t.true((await headerCluster(dirs.ours, 'v3.qcow2')).equals(await headerCluster(dirs.theirs, 'v3.qcow2')));
});

test('lazy_refcounts, size, data_file and the backing file as it is, like qemu-img', async (t) => {
  const dirs = await twinImages(t);
  await amendBoth(t, dirs, ['-p', '-o', 'lazy_refcounts=on', 'v3.qcow2'], 'v3.qcow2');
  await amendBoth(t, dirs, ['-o', 'lazy_refcounts=off', '-t', 'none', 'v3.qcow2'], 'v3.qcow2');
  await amendBoth(t, dirs, ['-o', 'size=8M', 'v3.qcow2'], 'v3.qcow2');
  await amendBoth(t, dirs, ['-o', 'size=2M', '-f', 'qcow2', 'v3.qcow2'], 'v3.qcow2');
  await amendBoth(t, dirs, ['-o', 'refcount_bits=16', 'v3.qcow2'], 'v3.qcow2');
  await amendBoth(t, dirs, ['-o', 'backing_file=v3.qcow2,backing_fmt=qcow2', 'ov.qcow2'], 'ov.qcow2');
  await amendBoth(t, dirs, ['-o', 'data_file_raw=off', 'df.qcow2'], 'df.qcow2');
  await amendBoth(t, dirs, ['-o', 'data_file=moved.raw', 'df.qcow2'], 'df.qcow2');
  t.true((await headerCluster(dirs.ours, 'df.qcow2')).equals(await headerCluster(dirs.theirs, 'df.qcow2')));
});

test('a dirty image is cleaned before its header changes', async (t) => {
  const dirs = await twinImages(t);
  for (const dir of [dirs.theirs, dirs.ours]) {
    const file = path.join(dir, 'lazy.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', file, '1M');
    // qemu-io's abort kills it by SIGABRT: the image stays dirty.
    await runProgram('qemu-io', ['-c', 'write -P 9 0 128k', '-c', 'abort', file]).catch((error: { signal?: string }) => t.is(error.signal, 'SIGABRT'));
    t.true((await readHeader(file)).header.dirty);
    await copyFile(file, path.join(dir, 'lazy2.qcow2'));
  }
  await amendBoth(t, dirs, ['-o', 'lazy_refcounts=off', 'lazy.qcow2'], 'lazy.qcow2', false);
  await amendBoth(t, dirs, ['-o', 'compat=0.10', 'lazy2.qcow2'], 'lazy2.qcow2', false);
});

test('errors: messages and exit codes of qemu-img amend, nothing changed', async (t) => {
  const dirs = await twinImages(t);
  for (const dir of [dirs.theirs, dirs.ours]) {
    await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', path.join(dir, 'orphan.qcow2'), '1M');
  }
  const cases: [string[], string][] = [
    [['-o', 'compat=0.10', 'orphan.qcow2'], 'v3.qcow2'],
    [['-o', 'foo=1', 'v3.qcow2'], 'v3.qcow2'],
    [['-o', 'cluster_size=4k', 'v3.qcow2'], 'v3.qcow2'],
    [['-o', 'lazy_refcounts=maybe', 'v3.qcow2'], 'v3.qcow2'],
    [['-o', 'compat=2', 'v3.qcow2'], 'v3.qcow2'],
    [['-o', 'lazy_refcounts=on', 'v2.qcow2'], 'v2.qcow2'],
    [['-o', 'compat=0.10,lazy_refcounts=on', 'v3.qcow2'], 'v3.qcow2'],
    [['-o', 'refcount_bits=8', 'v2.qcow2'], 'v2.qcow2'],
    [['-o', 'refcount_bits=3', 'v3.qcow2'], 'v3.qcow2'],
    [['-o', 'backing_file=other.qcow2', 'ov.qcow2'], 'ov.qcow2'],
    [['-o', 'backing_file=v3.qcow2', 'ov.qcow2'], 'ov.qcow2'],
    [['-o', 'encrypt.new-secret=s', 'v3.qcow2'], 'v3.qcow2'],
    [['-o', 'data_file=x.raw', 'v3.qcow2'], 'v3.qcow2'],
    [['-o', 'data_file_raw=on', 'v3.qcow2'], 'v3.qcow2'],
    [['-o', 'compat=0.10', 'df.qcow2'], 'df.qcow2'],
    [['-o', 'compat=1.1', 'nope.qcow2'], 'v3.qcow2'],
    [['-o', 'compat=1.1', '-f', 'foo', 'v3.qcow2'], 'v3.qcow2'],
    [['-o', 'compat=1.1', '-t', 'foo', 'v3.qcow2'], 'v3.qcow2'],
    [['-o', 'compat=1.1', '-f', 'raw', 'v3.qcow2'], 'v3.qcow2'],
    [['-o', 'compat=1.1', 'v3.qcow2', 'v2.qcow2'], 'v3.qcow2'],
    [['-o', 'help', 'v3.qcow2'], 'v3.qcow2'],
    [['-f', 'qcow2', '-o', 'help'], 'v3.qcow2'],
    [['v3.qcow2'], 'v3.qcow2'],
    [['-o'], 'v3.qcow2'],
  ];
  for (const [args, image] of cases) await amendBoth(t, dirs, args, image);
});

test('library: what this package refuses says which option, with a code', async (t) => {
  const dir = await tempDir(t);
  const at = (name: string) => path.join(dir, name);
  await qemuImg('create', '-q', '-f', 'qcow2', at('a.qcow2'), '1M');
  const before = await readFile(at('a.qcow2'));
  await t.throwsAsync(amend(at('a.qcow2'), { refcountBits: 8 }), { code: ErrorCodes.UNSUPPORTED, message: /^refcount_bits: / });
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', at('zstd.qcow2'), '1M');
  await t.throwsAsync(amend(at('zstd.qcow2'), { compat: '0.10' }), {
    code: ErrorCodes.UNSUPPORTED,
    message: 'Cannot downgrade an image with incompatible features 0x8 set',
  });
  await qemuImg('snapshot', '-c', 's1', at('a.qcow2'));
  const withSnapshot = await readFile(at('a.qcow2'));
  await t.throwsAsync(amend(at('a.qcow2'), { compat: '0.10' }), { code: ErrorCodes.UNSUPPORTED, message: /^compat: .*snapshots/ });
  t.true((await readFile(at('a.qcow2'))).equals(withSnapshot), 'nothing written');
  await qemuImg('create', '-q', '-f', 'qcow2', at('b.qcow2'), '1M');
  await qemuImg('bitmap', '--add', at('b.qcow2'), 'b0');
  await t.throwsAsync(amend(at('b.qcow2'), { compat: '0.10' }), { code: ErrorCodes.UNSUPPORTED, message: /^compat: .*bitmaps/ });
  await amend(at('b.qcow2'), { lazyRefcounts: true });
  const { header } = await readHeader(at('b.qcow2'));
  t.true(header.lazyRefcounts);
  t.true(header.bitmapsAutoclear, 'a header-only change leaves the bitmaps consistent');
  t.regex(await qemuImg('check', at('b.qcow2')), /No errors were found/);
  t.false(before.equals(withSnapshot));
});
