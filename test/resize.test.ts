/** `qcow2 resize` against `qemu-img resize` on twin images: the same output, exit codes, sizes and contents. */
import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes, open, resize } from '../ts/index.js';
import { qemuImg, qemuIo, tempDir } from './helpers/qemu.js';
import { runTwin, twinDirs } from './helpers/twin.js';

type Dirs = { theirs: string; ours: string };

/** The same image in both folders: `name` of `size`, with a pattern written near its start and end. */
async function twinImage(dirs: Dirs, name: string, format: 'raw' | 'qcow2', size: string): Promise<void> {
  for (const dir of [dirs.theirs, dirs.ours]) {
    const file = path.join(dir, name);
    await qemuImg('create', '-q', '-f', format, file, size);
    await qemuIo('-f', format, '-c', 'write -P 7 0 64k', '-c', 'write -P 8 1M 64k', file);
  }
}

/** The virtual size qemu-img reports. */
async function virtualSize(file: string): Promise<number> {
  return (JSON.parse(await qemuImg('info', '--output=json', file)) as { 'virtual-size': number })['virtual-size'];
}

/**
 * Run `resize ARGS` with both tools on twin images; outputs, sizes and contents must agree, and
 * allocation too unless `layoutMayDiffer` (preallocated clusters land where each allocator puts them).
 */
async function resizeBoth(t: ExecutionContext, dirs: Dirs, name: string, args: string[], layoutMayDiffer = false): Promise<void> {
  const { theirs, ours } = await runTwin(dirs, ['resize', ...args]);
  const label = args.join(' ');
  t.is(ours.stdout, theirs.stdout, `stdout of ${label}`);
  t.is(ours.stderr, theirs.stderr, `stderr of ${label}`);
  t.is(ours.code, theirs.code, `exit code of ${label}`);
  const [a, b] = [path.join(dirs.ours, name), path.join(dirs.theirs, name)];
  t.is(await virtualSize(a), await virtualSize(b), `size after ${label}`);
  const compare = await qemuImg('compare', ...(layoutMayDiffer ? [] : ['-s']), a, b).catch((error: Error) => error.message);
  t.regex(compare, /Images are identical/, `content after ${label}`);
  if (name.endsWith('.qcow2')) t.regex(await qemuImg('check', a), /No errors were found/, `check after ${label}`);
}

test('raw: grow, shrink, preallocation and errors like qemu-img resize', async (t) => {
  const dirs = await twinDirs(await tempDir(t));
  await twinImage(dirs, 'a.raw', 'raw', '2M');
  const cases = [
    ['-f', 'raw', 'a.raw', '3M'],
    ['-f', 'raw', 'a.raw', '+1M'],
    ['-f', 'raw', 'a.raw', '-1M'],
    ['-f', 'raw', 'a.raw', '--', '-1M'],
    ['--shrink', '-f', 'raw', 'a.raw', '-1M'],
    ['--shrink', '-f', 'raw', 'a.raw', '1100001'],
    ['-f', 'raw', '--preallocation=falloc', 'a.raw', '3M'],
    ['-f', 'raw', '--preallocation=full', 'a.raw', '4M'],
    ['-f', 'raw', '--preallocation=metadata', 'a.raw', '5M'],
    ['-f', 'raw', '--preallocation=xx', 'a.raw', '5M'],
    ['--shrink', '-f', 'raw', '--preallocation=full', 'a.raw', '1M'],
    ['-f', 'raw', 'a.raw', '0'],
    ['-f', 'raw', 'a.raw', '--', '-100M'],
    ['-f', 'raw', 'a.raw', '1X'],
    ['-f', 'raw', 'a.raw'],
    ['a.raw', '1M', '2M'],
    ['-q', '-f', 'raw', 'a.raw', '6M'],
    ['missing.raw', '6M'],
  ];
  for (const args of cases) await resizeBoth(t, dirs, 'a.raw', args);
  t.true((await stat(path.join(dirs.ours, 'a.raw'))).blocks * 512 >= 4 << 20 - 1, 'full preallocation wrote the blocks');
});

test('qcow2: grow, shrink, preallocation and errors like qemu-img resize', async (t) => {
  const dirs = await twinDirs(await tempDir(t));
  await twinImage(dirs, 'a.qcow2', 'qcow2', '2M');
  const cases = [
    ['a.qcow2', '3M'],
    ['a.qcow2', '+1G'],
    ['a.qcow2', '-1M'],
    ['--shrink', 'a.qcow2', '-1G'],
    ['--shrink', 'a.qcow2', '1M'],
    ['a.qcow2', '1000'],
    ['--shrink', 'a.qcow2', '1000'],
    ['a.qcow2', '5000000'],
    ['--shrink', '--preallocation=full', 'a.qcow2', '1M'],
    ['--preallocation=xx', 'a.qcow2', '8M'],
    ['a.qcow2', '+0'],
    ['--shrink', 'a.qcow2', '0'],
    ['-q', 'a.qcow2', '9M'],
  ];
  for (const args of cases) await resizeBoth(t, dirs, 'a.qcow2', args);
});

test('qcow2: growing with preallocation like qemu-img resize', async (t) => {
  const dirs = await twinDirs(await tempDir(t));
  await twinImage(dirs, 'a.qcow2', 'qcow2', '2M');
  for (const mode of ['metadata', 'falloc', 'full']) await resizeBoth(t, dirs, 'a.qcow2', [`--preallocation=${mode}`, 'a.qcow2', '+2M'], true);
  const map = JSON.parse(await qemuImg('map', '--output=json', path.join(dirs.ours, 'a.qcow2'))) as Array<{ start: number; data: boolean }>;
  t.true(map.filter((e) => e.start >= 2 << 20).every((e) => e.data), 'the added space is allocated');
});

test('library: relative sizes, refusals with codes, and the file keeps its bytes', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.raw');
  await qemuImg('create', '-q', '-f', 'raw', file, '1M');
  await qemuIo('-f', 'raw', '-c', 'write -P 3 0 1M', file);
  t.is(await resize(file, { delta: 1 << 20 }, { format: 'raw' }), 2 << 20);
  await t.throwsAsync(resize(file, 1 << 20, { format: 'raw' }), {
    code: ErrorCodes.INVALID_ARGUMENT,
    message: 'Use the --shrink option to perform a shrink operation.',
  });
  await t.throwsAsync(resize(file, { delta: -(3 << 20) }, { format: 'raw', shrink: true }), { message: 'New image size must be positive' });
  await t.throwsAsync(resize(path.join(dir, 'missing'), 1 << 20), { code: 'ENOENT', message: /Could not open .*No such file or directory/ });
  t.is(await resize(file, 512 * 1024, { format: 'raw', shrink: true }), 512 * 1024);
  t.true((await readFile(file)).equals(Buffer.alloc(512 * 1024, 3)));
  const image = await open(file, { format: 'raw', readOnly: true });
  t.is(image.size, 512 * 1024);
  await image.close();
});
