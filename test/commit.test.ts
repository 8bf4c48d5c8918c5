/** `qcow2 commit` against `qemu-img commit` on twin chains: the same output, exit codes, contents and allocation of every image. */
import { copyFile, readFile, stat } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes, commit } from '../ts/index.js';
import { mapShape, qemuImg, qemuIo, tempDir } from './helpers/qemu.js';
import { runTwin, twinDirs } from './helpers/twin.js';

type Dirs = { theirs: string; ours: string };

const IMAGES = ['top.qcow2', 'mid.qcow2', 'base.qcow2'];

/**
 * base (4M: pattern 1 on 0..2M) ← mid (pattern 2 on 1M..2M, zeros at 3M) ← top (6M: zeros at 0,
 * pattern 3 at 1536k, 100k of pattern 4 at 5M, past mid's end); `topOptions` go to top's creation.
 */
async function makeChain(dir: string, topOptions: string[] = []): Promise<void> {
  const at = (name: string) => path.join(dir, name);
  await qemuImg('create', '-q', '-f', 'qcow2', at('base.qcow2'), '4M');
  await qemuIo('-c', 'write -P 1 0 2M', at('base.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', at('mid.qcow2'));
  await qemuIo('-c', 'write -P 2 1M 1M', '-c', 'write -z 3M 128k', at('mid.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', ...topOptions, '-b', 'mid.qcow2', '-F', 'qcow2', at('top.qcow2'), '6M');
  await qemuIo('-c', 'write -z 0 64k', '-c', 'write -P 3 1536k 64k', '-c', 'write -P 4 5M 100k', at('top.qcow2'));
  for (const name of IMAGES) await copyFile(at(name), at(`${name}.orig`));
}

async function twinChains(t: ExecutionContext, topOptions: string[] = []): Promise<Dirs> {
  const dirs = await twinDirs(await tempDir(t));
  await Promise.all([makeChain(dirs.theirs, topOptions), makeChain(dirs.ours, topOptions)]);
  return dirs;
}

/** Put every image of both chains back as it was made. */
async function restore(dirs: Dirs): Promise<void> {
  for (const dir of [dirs.theirs, dirs.ours]) {
    for (const name of IMAGES) await copyFile(path.join(dir, `${name}.orig`), path.join(dir, name));
  }
}

async function virtualSize(file: string): Promise<number> {
  return (JSON.parse(await qemuImg('info', '--output=json', file)) as { 'virtual-size': number })['virtual-size'];
}

/** Run `commit ARGS` with both tools; outputs, exit codes, and each image's size, content and allocation must agree. */
async function commitBoth(t: ExecutionContext, dirs: Dirs, args: string[], compareStdout = true): Promise<void> {
  const label = args.join(' ');
  const { theirs, ours } = await runTwin(dirs, ['commit', ...args]);
  if (compareStdout) t.is(ours.stdout, theirs.stdout, `stdout of ${label}`);
  t.is(ours.stderr, theirs.stderr, `stderr of ${label}`);
  t.is(ours.code, theirs.code, `exit code of ${label}`);
  for (const name of IMAGES) {
    const [a, b] = [path.join(dirs.ours, name), path.join(dirs.theirs, name)];
    t.is(await virtualSize(a), await virtualSize(b), `size of ${name} after ${label}`);
    t.regex(await qemuImg('compare', a, b), /Images are identical/, `content of ${name} after ${label}`);
    t.is(await mapShape(a), await mapShape(b), `allocation of ${name} after ${label}`);
    t.regex(await qemuImg('check', a), /No errors were found/, `check of ${name} after ${label}`);
  }
}

test('into the backing file: data and zeros committed, the backing file grown, the overlay emptied, like qemu-img', async (t) => {
  const dirs = await twinChains(t);
  await commitBoth(t, dirs, ['top.qcow2']);
  const mid = path.join(dirs.ours, 'mid.qcow2');
  t.regex(await qemuImg('compare', path.join(dirs.ours, 'top.qcow2.orig'), mid), /Images are identical/, 'mid reads as top did');
  const top = path.join(dirs.ours, 'top.qcow2');
  const end = (JSON.parse(await qemuImg('check', '--output=json', top)) as { 'image-end-offset': number })['image-end-offset'];
  t.is((await stat(top)).size, end, 'the emptied overlay ends after its last cluster in use');
  await restore(dirs);
  await commitBoth(t, dirs, ['-q', '-t', 'none', '-r', '64M', 'top.qcow2']);
  await restore(dirs);
  await commitBoth(t, dirs, ['-d', 'mid.qcow2']);
  t.true((await readFile(path.join(dirs.ours, 'mid.qcow2'))).equals(await readFile(path.join(dirs.ours, 'mid.qcow2.orig'))), '-d keeps the overlay');
});

test('-b: into an image deeper in the chain, the layers between committed too, the overlay kept', async (t) => {
  const dirs = await twinChains(t);
  await commitBoth(t, dirs, ['-b', 'base.qcow2', 'top.qcow2']);
  const base = path.join(dirs.ours, 'base.qcow2');
  t.regex(await qemuImg('compare', path.join(dirs.ours, 'top.qcow2.orig'), base), /Images are identical/);
  t.true((await readFile(path.join(dirs.ours, 'top.qcow2'))).equals(await readFile(path.join(dirs.ours, 'top.qcow2.orig'))));
  await restore(dirs);
  await commitBoth(t, dirs, ['-b', 'mid.qcow2', 'top.qcow2']);
});

test('version 2 and extended-L2 overlays are committed and emptied like qemu-img does it', async (t) => {
  for (const options of [['-o', 'compat=0.10'], ['-o', 'extended_l2=on,cluster_size=64k']]) {
    const dirs = await twinChains(t, options);
    await commitBoth(t, dirs, ['top.qcow2']);
  }
});

test('progress: -p draws qemu-img\'s display from 0 to 100', async (t) => {
  const dirs = await twinChains(t);
  const { ours } = await runTwin(dirs, ['commit', '-p', 'top.qcow2']);
  t.is(ours.code, 0);
  t.true(ours.stdout.startsWith('    (0.00/100%)\r'), ours.stdout);
  t.true(ours.stdout.endsWith('    (100.00/100%)\r\nImage committed.\n'), ours.stdout);
});

test('errors: messages and exit codes of qemu-img commit, nothing changed', async (t) => {
  const dirs = await twinChains(t);
  for (const dir of [dirs.theirs, dirs.ours]) {
    await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', path.join(dir, 'orphan.qcow2'), '1M');
  }
  const cases = [
    ['nope.qcow2'],
    ['orphan.qcow2'],
    ['base.qcow2'],
    ['-b', 'nope.qcow2', 'top.qcow2'],
    ['-b', 'top.qcow2', 'top.qcow2'],
    ['-r', 'x', 'top.qcow2'],
    ['-t', 'foo', 'top.qcow2'],
    ['-f', 'raw', 'top.qcow2'],
    ['-f', 'foo', 'top.qcow2'],
    [],
    ['top.qcow2', 'mid.qcow2'],
    ['-p', 'base.qcow2'],
    ['--bogus', 'top.qcow2'],
  ];
  for (const args of cases) await commitBoth(t, dirs, args);
});

test('library: into a raw backing file; typed errors', async (t) => {
  const dir = await tempDir(t);
  const raw = path.join(dir, 'disk.raw');
  const top = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-q', '-f', 'raw', raw, '2M');
  await qemuIo('-f', 'raw', '-c', 'write -P 6 0 2M', raw);
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'disk.raw', '-F', 'raw', top);
  await qemuIo('-c', 'write -P 8 512k 4k', '-c', 'write -z 1M 64k', top);
  await copyFile(top, `${top}.orig`);
  await t.throwsAsync(commit(top), { code: ErrorCodes.FILE_NAME_NOT_ALLOWED });
  await t.throwsAsync(commit(top, { rateLimit: -1 }), { code: ErrorCodes.INVALID_ARGUMENT });
  await t.throwsAsync(commit(top, { followFileNames: true, base: 'other.raw' }), {
    code: ErrorCodes.INVALID_ARGUMENT,
    message: `Did not find 'other.raw' in the backing chain of '${top}'`,
  });
  const seen: number[] = [];
  await commit(top, { followFileNames: true, onProgress: (done) => seen.push(done) });
  t.is(seen[seen.length - 1], 2 * 65536, 'progress counts the bytes committed: the written cluster and the zero one');
  t.regex(await qemuImg('compare', '-f', 'qcow2', '-F', 'raw', `${top}.orig`, raw), /Images are identical/);
  t.regex(await qemuImg('compare', top, raw), /Images are identical/);
  t.regex(await qemuImg('check', top), /No errors were found/);
});
