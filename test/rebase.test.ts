/** `qcow2 rebase` against `qemu-img rebase` on twin chains: the same output, exit codes, headers, contents and allocation. */
import { spawn } from 'node:child_process';
import { copyFile, mkdir, readFile, stat } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes, Qcow2Error, readHeader, rebase, rewriteHeader } from '../ts/index.js';
import { CLI, headerFacts, mapShape, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';
import { runIn, runTwin, twinDirs } from './helpers/twin.js';

type Dirs = { theirs: string; ours: string };

/**
 * In each folder: base (4M, pattern 1 on its first 2M) ← mid (pattern 2 on 1M..2M, zeros at 3M)
 * ← top (pattern 3 at 1536k, zeros at 0, data past mid's end at 5M; 6M long), plus new.qcow2
 * (pattern 1 on its first 1M, pattern 9 at 2M) and other.raw (1M of pattern 5).
 */
async function makeChain(dir: string): Promise<void> {
  const at = (name: string) => path.join(dir, name);
  await qemuImg('create', '-q', '-f', 'qcow2', at('base.qcow2'), '4M');
  await qemuIo('-c', 'write -P 1 0 2M', at('base.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', at('mid.qcow2'));
  await qemuIo('-c', 'write -P 2 1M 1M', '-c', 'write -z 3M 128k', at('mid.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', at('top.qcow2'), '6M');
  await qemuIo('-c', 'write -P 3 1536k 64k', '-c', 'write -z 0 64k', '-c', 'write -P 4 5M 100k', at('top.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', at('new.qcow2'), '4M');
  await qemuIo('-c', 'write -P 1 0 1M', '-c', 'write -P 9 2M 4k', at('new.qcow2'));
  await qemuImg('create', '-q', '-f', 'raw', at('other.raw'), '1M');
  await qemuIo('-f', 'raw', '-c', 'write -P 5 0 1M', at('other.raw'));
  await copyFile(at('top.qcow2'), at('top.orig'));
}

async function twinChains(t: ExecutionContext): Promise<Dirs> {
  const dirs = await twinDirs(await tempDir(t));
  await Promise.all([makeChain(dirs.theirs), makeChain(dirs.ours)]);
  return dirs;
}

/** What qemu-img info says about a header that rebase may change: backing file and format, size, version, lazy refcounts. */
async function rebaseFacts(file: string): Promise<unknown> {
  const { backing, backingFormat, size, compat, lazy } = await headerFacts(file);
  return { backing, backingFormat, size, compat, lazy };
}

/** Run `rebase ARGS` with both tools; outputs, exit codes, headers, contents and allocation of `image` must agree. */
async function rebaseBoth(t: ExecutionContext, dirs: Dirs, args: string[], image = 'top.qcow2', sameAllocation = true): Promise<void> {
  const label = args.join(' ');
  const { theirs, ours } = await runTwin(dirs, ['rebase', ...args]);
  t.is(ours.stdout, theirs.stdout, `stdout of ${label}`);
  t.is(ours.stderr, theirs.stderr, `stderr of ${label}`);
  t.is(ours.code, theirs.code, `exit code of ${label}`);
  const [a, b] = [path.join(dirs.ours, image), path.join(dirs.theirs, image)];
  t.deepEqual(await rebaseFacts(a), await rebaseFacts(b), `header after ${label}`);
  t.regex(await qemuImg('compare', a, b), /Images are identical/, `content after ${label}`);
  if (sameAllocation) t.is(await mapShape(a), await mapShape(b), `allocation after ${label}`);
  t.regex(await qemuImg('check', a), /No errors were found/, `check after ${label}`);
}

test('safe mode: onto another image, onto nothing, onto the base of the chain, with progress, like qemu-img', async (t) => {
  const dirs = await twinChains(t);
  await rebaseBoth(t, dirs, ['-p', '-b', 'new.qcow2', '-F', 'qcow2', 'top.qcow2']);
  await rebaseBoth(t, dirs, ['-b', 'other.raw', '-F', 'raw', 'top.qcow2']);
  await rebaseBoth(t, dirs, ['-q', '-b', '', 'top.qcow2']);
  const orig = path.join(dirs.ours, 'top.orig');
  t.regex(await qemuImg('compare', orig, path.join(dirs.ours, 'top.qcow2')), /Images are identical/, 'the guest sees what it saw');
  for (const dir of [dirs.theirs, dirs.ours]) await copyFile(path.join(dir, 'top.orig'), path.join(dir, 'top.qcow2'));
  await rebaseBoth(t, dirs, ['-p', '-t', 'none', '-T', 'writethrough', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2']);
  t.regex(await qemuImg('compare', orig, path.join(dirs.ours, 'top.qcow2')), /Images are identical/);
});

test('extended-L2 and version 2 images get the allocation qemu-img gives them', async (t) => {
  const dirs = await twinChains(t);
  for (const dir of [dirs.theirs, dirs.ours]) {
    for (const [name, options] of [['xl2.qcow2', 'extended_l2=on'], ['v2.qcow2', 'compat=0.10']]) {
      await qemuImg('create', '-q', '-f', 'qcow2', '-o', options, '-b', 'mid.qcow2', '-F', 'qcow2', path.join(dir, name));
      await qemuIo('-c', 'write -P 6 8k 4k', '-c', 'write -z 3M 64k', path.join(dir, name));
    }
  }
  for (const name of ['xl2.qcow2', 'v2.qcow2']) {
    await rebaseBoth(t, dirs, ['-b', 'new.qcow2', '-F', 'qcow2', name], name);
    await rebaseBoth(t, dirs, ['-b', '', name], name);
  }
});

test('relative names are looked up beside the image and stored as given', async (t) => {
  const dirs = await twinChains(t);
  for (const dir of [dirs.theirs, dirs.ours]) {
    await mkdir(path.join(dir, 'sub'));
    await qemuImg('create', '-q', '-f', 'qcow2', '-b', '../mid.qcow2', '-F', 'qcow2', path.join(dir, 'sub', 'img.qcow2'));
    await qemuIo('-c', 'write -P 7 512k 64k', path.join(dir, 'sub', 'img.qcow2'));
    await copyFile(path.join(dir, 'new.qcow2'), path.join(dir, 'sub', 'new.qcow2'));
  }
  await rebaseBoth(t, dirs, ['-b', 'new.qcow2', '-F', 'qcow2', 'sub/img.qcow2'], 'sub/img.qcow2');
  await rebaseBoth(t, dirs, ['-b', 'missing.qcow2', '-F', 'qcow2', 'sub/img.qcow2'], 'sub/img.qcow2');
  await rebaseBoth(t, dirs, ['-b', '../base.qcow2', '-F', 'qcow2', 'sub/img.qcow2'], 'sub/img.qcow2');
});

test('unsafe mode rewrites only the header, and the header cluster qemu-img writes', async (t) => {
  const dirs = await twinChains(t);
  await rebaseBoth(t, dirs, ['-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'top.qcow2'], 'mid.qcow2');
  const header = async (dir: string) => (await readFile(path.join(dir, 'top.qcow2'))).subarray(0, 65536);
  t.true((await header(dirs.ours)).equals(await header(dirs.theirs)), 'header cluster byte for byte');
  await rebaseBoth(t, dirs, ['-u', '-p', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2']);
  t.true((await header(dirs.ours)).equals(await header(dirs.theirs)));
  await rebaseBoth(t, dirs, ['-u', 'top.qcow2']);
  t.true((await header(dirs.ours)).equals(await header(dirs.theirs)), 'no backing file: name and format extension gone');
});

test('errors: messages and exit codes of qemu-img rebase, nothing changed', async (t) => {
  const dirs = await twinChains(t);
  for (const dir of [dirs.theirs, dirs.ours]) {
    await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', path.join(dir, 'orphan.qcow2'), '1M');
  }
  const cases = [
    ['-u', '-b', 'new.qcow2', 'top.qcow2'],
    ['-b', 'new.qcow2', '-F', 'qcow2', 'orphan.qcow2'],
    ['-b', 'new.qcow2', '-F', 'qcow2', 'nope.qcow2'],
    ['-p', '-b', 'nope.qcow2', '-F', 'qcow2', 'top.qcow2'],
    ['-b', 'new.qcow2', '-F', 'foo', 'top.qcow2'],
    ['-u', '-b', 'new.qcow2', '-F', 'foo', 'top.qcow2'],
    ['-b', 'new.qcow2', '-F', 'qcow2', '-f', 'foo', 'top.qcow2'],
    ['-b', 'other.raw', '-F', 'qcow2', 'top.qcow2'],
    ['-f', 'raw', '-b', 'new.qcow2', '-F', 'qcow2', 'top.qcow2'],
    ['-b', 'new.qcow2', '-F', 'qcow2', 'other.raw'],
    ['-t', 'foo', '-b', 'new.qcow2', '-F', 'qcow2', 'top.qcow2'],
    ['-T', 'foo', '-b', 'new.qcow2', '-F', 'qcow2', 'top.qcow2'],
    ['top.qcow2'],
    ['-b', 'new.qcow2'],
    ['-b', 'new.qcow2', 'top.qcow2', 'mid.qcow2'],
    ['-x', 'top.qcow2'],
    ['-b'],
  ];
  for (const args of cases) await rebaseBoth(t, dirs, args);
  // qemu-img copies the differing data before it finds -F missing; this package refuses first (the guest sees the same either way).
  await rebaseBoth(t, dirs, ['-b', 'new.qcow2', 'top.qcow2'], 'top.qcow2', false);
  const refused = await runIn(dirs.ours, process.execPath, [path.join(__dirname, '..', 'ts', 'cli', 'main.js'), 'rebase', '--object', 'secret,id=s', '-b', '', 'top.qcow2']);
  t.is(refused.code, 1);
  t.is(refused.stderr, 'qcow2: --object is not supported\n');
});

test('library: typed errors; a header that does not fit or would be invalid is refused, nothing written', async (t) => {
  const dir = await tempDir(t);
  const image = path.join(dir, 'small.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', image, '1M');
  const before = await readFile(image);
  const long = `${'a'.repeat(480)}.qcow2`;
  await t.throwsAsync(rebase(image, { backingFile: long, backingFormat: 'qcow2', unsafe: true }), {
    code: 'ENOSPC',
    message: `Could not change the backing file to '${long}': No space left in the file header`,
  });
  t.true((await readFile(image)).equals(before), 'nothing written');
  await t.throwsAsync(rebase(image, { backingFile: 'x.qcow2', unsafe: true }), {
    code: ErrorCodes.INVALID_ARGUMENT,
    message: "Could not change the backing file to 'x.qcow2': backing format must be specified",
  });
  await t.throwsAsync(rebase(path.join(dir, 'nope.qcow2'), { backingFile: '', unsafe: true }), { code: 'ENOENT' });
  await t.throwsAsync(rebase(image, { backingFile: 'nope.qcow2', backingFormat: 'qcow2' }), {
    code: 'ENOENT',
    message: `Could not open new backing file 'nope.qcow2': Could not open '${path.join(dir, 'nope.qcow2')}': No such file or directory`,
  });
  await t.throwsAsync(rebase(image, { backingFile: 'small.qcow2', backingFormat: 'qcow2' }), {
    code: ErrorCodes.BACKING_LOOP,
    message: `Could not open new backing file 'small.qcow2': it is the image being rebased ('${image}')`,
  });
  await rebase(image, { backingFile: 'x.qcow2', backingFormat: 'raw', unsafe: true });
  const { header } = await readHeader(image);
  t.is(header.backingFile, 'x.qcow2');
  t.is(header.backingFormat, 'raw');
  const err = await t.throwsAsync(rewriteHeader(image, (h) => ({ ...h, l1TableOffset: 3 })));
  t.true(err instanceof Qcow2Error);
  t.is((err as Qcow2Error).code, ErrorCodes.INVALID_ARGUMENT, 'an invalid header is refused before it is written');
  await rebase(image, { backingFile: '', unsafe: true });
  t.is((await readHeader(image)).header.backingFile, undefined);
  t.regex(await qemuImg('check', image), /No errors were found/);
});

test('killed while copying, the image still reads as before and checks without corruption', async (t) => {
  const dir = await tempDir(t);
  const at = (name: string) => path.join(dir, name);
  await qemuImg('create', '-q', '-f', 'qcow2', at('base.qcow2'), '64M');
  await qemuIo('-c', 'write -P 1 0 64M', at('base.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', at('top.qcow2'));
  await qemuIo('-c', 'write -P 2 1M 1M', at('top.qcow2'));
  await copyFile(at('top.qcow2'), at('top.orig'));
  const before = (await stat(at('top.qcow2'))).size;
  const child = spawn(process.execPath, [CLI, 'rebase', '-b', '', at('top.qcow2')], { stdio: 'ignore' });
  const exited = new Promise((resolve) => child.on('exit', resolve));
  // Killed once the copy has begun (or not at all when it is over first): either way the image must be whole.
  while (child.exitCode === null && (await stat(at('top.qcow2'))).size < before + (8 << 20)) await new Promise((r) => setImmediate(r));
  child.kill('SIGKILL');
  await exited;
  t.regex(await qemuImg('compare', at('top.orig'), at('top.qcow2')), /Images are identical/);
  const checked = await runProgram('qemu-img', ['check', at('top.qcow2')]);
  t.true(checked.code === 0 || checked.code === 3, `check exit code ${checked.code}: ${checked.stdout}`);
});
