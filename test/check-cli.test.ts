/** The `qcow2 check` command against `qemu-img check`: arguments, errors, exit codes, -q, JSON after a repair. */
import { copyFile, truncate } from 'node:fs/promises';
import path from 'node:path';

import test from 'ava';

import { check, checkExitCode } from '../ts/index.js';
import { hostCluster, setRefcount } from './helpers/check-images.js';
import { qcow2Cli, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';

/** qemu-img's messages as our CLI words them. */
function asOurs(text: string): string {
  return text.replace(/^qemu-img: /gm, 'qcow2: ').replace(/Try 'qemu-img --help'/g, "Try 'qcow2 --help'");
}

/** An 8 MiB image with a leaked cluster (refcount 2 under a data cluster: a leak and a COPIED error). */
async function leakyImage(dir: string, name = 'leak.qcow2'): Promise<string> {
  const file = path.join(dir, name);
  await qemuImg('create', '-q', '-f', 'qcow2', file, '8M');
  await qemuIo('-c', 'write -P 1 0 1M', file);
  await setRefcount(file, await hostCluster(file, 0), 2);
  return file;
}

/** Run both tools with `args` (FILE stands for a fresh copy of `image` each) and compare everything. */
async function same(t: import('ava').ExecutionContext, image: string, args: string[]): Promise<void> {
  const dir = path.dirname(image);
  const mine = path.join(dir, `ours-${path.basename(image)}`);
  const theirs = path.join(dir, `qemu-${path.basename(image)}`);
  await copyFile(image, mine);
  await copyFile(image, theirs);
  const ours = await qcow2Cli('check', ...args.map((a) => (a === 'FILE' ? mine : a)));
  const ref = await runProgram('qemu-img', ['check', ...args.map((a) => (a === 'FILE' ? theirs : a))]);
  t.is(ours.stdout.replaceAll(mine, theirs), ref.stdout, `stdout: ${args.join(' ')}`);
  t.is(ours.stderr.replaceAll(mine, theirs), asOurs(ref.stderr), `stderr: ${args.join(' ')}`);
  t.is(ours.code, ref.code, `exit code: ${args.join(' ')}`);
}

test('bad arguments: the same messages and exit codes as qemu-img check', async (t) => {
  const dir = await tempDir(t);
  const image = await leakyImage(dir);
  for (const args of [
    ['-r', 'bogus', 'FILE'],
    ['--output=xml', 'FILE'],
    [],
    ['FILE', 'FILE'],
    ['-T', 'bogus', 'FILE'],
    ['-x', 'FILE'],
    ['--bogus', 'FILE'],
    ['-r'],
    [path.join(dir, 'missing.qcow2')],
  ]) {
    await same(t, image, args);
  }
});

test('exit codes 2 (corruptions), 3 (leaks only) and 0 after -r leaks; -q; JSON after a repair; -T none', async (t) => {
  const dir = await tempDir(t);
  const image = await leakyImage(dir);
  for (const args of [['FILE'], ['-q', 'FILE'], ['-r', 'leaks', 'FILE'], ['-r', 'all', '--output=json', 'FILE'], ['-T', 'none', '--output=json', 'FILE'], ['-q', '-r', 'all', 'FILE']]) {
    await same(t, image, args);
  }
  const leaksOnly = path.join(dir, 'only.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', leaksOnly, '8M');
  await qemuIo('-c', 'write -P 1 0 1M', '-c', 'discard 64k 64k', leaksOnly);
  await setRefcount(leaksOnly, 3, 1);
  await same(t, leaksOnly, ['FILE']);
  const result = await check(leaksOnly);
  t.is(checkExitCode(result), (await runProgram('qemu-img', ['check', leaksOnly])).code);
});

test('raw images: "does not support checks" with exit code 63, and the probe warning with -r', async (t) => {
  const dir = await tempDir(t);
  const raw = path.join(dir, 'disk.img');
  await qemuImg('create', '-q', '-f', 'raw', raw, '1M');
  await same(t, raw, ['FILE']);
  await same(t, raw, ['-r', 'leaks', 'FILE']);
  await same(t, raw, ['-f', 'raw', '--output=json', 'FILE']);
  const result = await check(raw);
  t.is(result.format, 'raw');
  t.is(checkExitCode(result), 63);
});

test('check rejects bad options with a coded error', async (t) => {
  const dir = await tempDir(t);
  const image = await leakyImage(dir);
  await t.throwsAsync(check(image, { repair: 'some' as never }), { code: 'ERR_QCOW2_INVALID_ARGUMENT' });
  await t.throwsAsync(check(image, { cache: 'fast' as never }), { code: 'ERR_QCOW2_INVALID_ARGUMENT' });
  await t.throwsAsync(check(path.join(dir, 'nothing.qcow2')), { code: 'ENOENT' });
});

test('an image file of more clusters than qemu counts (sparse, 512-byte clusters): Check failed: File too large', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'huge.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', file, '4M');
  await truncate(file, 1100 * 2 ** 30);
  const ours = await qcow2Cli('check', file);
  const ref = await runProgram('qemu-img', ['check', file]);
  t.is(ours.stdout, ref.stdout);
  t.is(ours.stderr, asOurs(ref.stderr));
  t.is(ours.code, ref.code);
  t.is((await check(file)).failure, 'File too large');
});
