/** `qcow2 compare` against `qemu-img compare`: the same verdicts, messages and exit codes. */
import { copyFile, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { compareImages, open } from '../ts/index.js';
import { patternBytes, qcow2Cli, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';

/** Run both compares; assert equal stdout and exit code; return our exit code. */
async function sameVerdict(t: ExecutionContext, ...args: string[]): Promise<number> {
  const theirs = await runProgram('qemu-img', ['compare', ...args]);
  const ours = await qcow2Cli('compare', ...args);
  const what = args.map((a) => path.basename(a)).join(' ');
  t.is(ours.stdout, theirs.stdout, `stdout of compare ${what}`);
  t.is(ours.code, theirs.code, `exit code of compare ${what}: ${ours.stderr}`);
  return ours.code;
}

/** Images in one folder: a qcow2 with data, zero and compressed clusters, and its raw copy. */
async function images(t: ExecutionContext): Promise<{ dir: string; qcow: string; raw: string }> {
  const dir = await tempDir(t);
  const qcow = path.join(dir, 'a.qcow2');
  const raw = path.join(dir, 'a.raw');
  await qemuImg('create', '-q', '-f', 'qcow2', qcow, '6M');
  await qemuIo('-c', 'write -P 1 0 64k', '-c', 'write -z 1M 64k', '-c', 'write -c -P 3 2M 128k', '-c', 'write -P 4 5M 512k', qcow);
  await qemuImg('convert', '-O', 'raw', qcow, raw);
  return { dir, qcow, raw };
}

test('identical images: raw against qcow2, in both orders and strict mode', async (t) => {
  const { qcow, raw } = await images(t);
  t.is(await sameVerdict(t, qcow, raw), 0);
  t.is(await sameVerdict(t, raw, qcow), 0);
  t.is(await sameVerdict(t, raw, raw), 0);
  t.is(await sameVerdict(t, '-s', qcow, qcow), 0);
  t.is(await sameVerdict(t, '-f', 'qcow2', '-F', 'raw', qcow, raw), 0);
  t.is(await sameVerdict(t, '-f', 'qcow2', qcow, raw), 0);
  t.is(await sameVerdict(t, '-F', 'qcow2', raw, qcow), 0);
});

test('content mismatch: the offset of the first different sector', async (t) => {
  const { dir, qcow, raw } = await images(t);
  const other = path.join(dir, 'b.raw');
  await copyFile(raw, other);
  await qemuIo('-f', 'raw', '-c', 'write -P 9 1000 10', other);
  t.is(await sameVerdict(t, raw, other), 1);
  t.is(await sameVerdict(t, other, qcow), 1);
  const late = path.join(dir, 'c.raw');
  await copyFile(raw, late);
  await qemuIo('-f', 'raw', '-c', 'write -P 9 5439k 1', '-c', 'write -P 7 3M 4k', late);
  t.is(await sameVerdict(t, qcow, late), 1);
  t.is(await sameVerdict(t, '-q', qcow, late), 1);
});

test('data against an unallocated area: only zeroes match', async (t) => {
  const dir = await tempDir(t);
  const empty = path.join(dir, 'empty.qcow2');
  const written = path.join(dir, 'written.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', empty, '1M');
  await qemuImg('create', '-q', '-f', 'qcow2', written, '1M');
  await qemuIo('-c', 'write -P 0 0 64k', written);
  t.is(await sameVerdict(t, empty, written), 0);
  await qemuIo('-c', 'write -P 3 70000 10', written);
  t.is(await sameVerdict(t, empty, written), 1);
  t.is(await sameVerdict(t, written, empty), 1);
});

test('different sizes: a warning, then the tail of the longer image must be zero', async (t) => {
  const { dir, raw } = await images(t);
  const longer = path.join(dir, 'long.raw');
  await copyFile(raw, longer);
  await truncate(longer, 8 << 20);
  t.is(await sameVerdict(t, raw, longer), 0);
  t.is(await sameVerdict(t, longer, raw), 0);
  t.is(await sameVerdict(t, '-s', raw, longer), 1);
  await qemuIo('-f', 'raw', '-c', 'write -P 7 7M 4k', longer);
  t.is(await sameVerdict(t, raw, longer), 1);
  const q = path.join(dir, 'long.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', q, '8M');
  await qemuIo('-c', 'write -z 6M 64k', q);
  const empty = path.join(dir, 'empty.raw');
  await writeFile(empty, '');
  await truncate(empty, 6 << 20);
  t.is(await sameVerdict(t, empty, q), 0);
});

test('strict mode: allocation status differences count', async (t) => {
  const { dir, qcow, raw } = await images(t);
  t.is(await sameVerdict(t, '-s', qcow, raw), 1);
  const a = path.join(dir, 's1.qcow2');
  const b = path.join(dir, 's2.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', a, '128k');
  await qemuImg('create', '-q', '-f', 'qcow2', b, '128k');
  await qemuIo('-c', 'write -P 1 0 128k', a);
  await qemuIo('-c', 'write -P 1 64k 64k', '-c', 'write -P 1 0 64k', b);
  t.is(await sameVerdict(t, a, b), 0);
  t.is(await sameVerdict(t, '-s', a, b), 1);
  const c = path.join(dir, 's3.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', c, '128k');
  await qemuIo('-c', 'write -P 1 0 64k', '-c', 'write -z 64k 64k', c);
  const d = path.join(dir, 's4.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', d, '128k');
  await qemuIo('-c', 'write -P 1 0 64k', d);
  t.is(await sameVerdict(t, c, d), 0);
  t.is(await sameVerdict(t, '-s', c, d), 1);
});

test('strict mode with 512-byte clusters: the end-of-file flag only in the last L2 table', async (t) => {
  const dir = await tempDir(t);
  const base = path.join(dir, 'base.qcow2');
  const top = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', base, '2M');
  await qemuIo('-c', 'write -P 1 1M 512', '-c', 'write -P 2 1500k 512', base);
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', '-b', 'base.qcow2', '-F', 'qcow2', top);
  await qemuIo('-c', 'write -P 3 1905k 14848', top);
  t.is(await sameVerdict(t, '-s', top, base), 1);
  t.is(await sameVerdict(t, '-s', base, top), 1);
  const plain = path.join(dir, 'plain.qcow2');
  await qemuImg('convert', '-O', 'qcow2', '-o', 'cluster_size=512', base, plain);
  t.is(await sameVerdict(t, '-s', plain, base), 0);
  const copy = path.join(dir, 'copy.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', copy, '2M');
  await qemuIo('-c', 'write -P 1 1M 512', '-c', 'write -P 2 1500k 512', '-c', 'write -z 2047k 1k', copy);
  t.is(await sameVerdict(t, '-s', copy, base), 1);
  t.is(await sameVerdict(t, copy, base), 0);
});

test('backing chains compare by what the guest sees', async (t) => {
  const { dir, qcow, raw } = await images(t);
  const overlay = path.join(dir, 'overlay.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', overlay);
  t.is(await sameVerdict(t, overlay, raw), 0);
  t.is(await sameVerdict(t, '-s', overlay, qcow), 0);
  await qemuIo('-c', 'write -P 4 5M 64k', overlay);
  t.is(await sameVerdict(t, overlay, raw), 0);
  t.is(await sameVerdict(t, '-s', overlay, qcow), 0);
  await qemuIo('-c', 'write -z 3M 64k', overlay);
  t.is(await sameVerdict(t, overlay, qcow), 0);
  t.is(await sameVerdict(t, '-s', overlay, qcow), 1);
  await qemuIo('-c', 'write -z 2M 64k', overlay);
  t.is(await sameVerdict(t, overlay, raw), 1);
});

test('errors: exit 2 when an image cannot be opened, 1 for bad usage', async (t) => {
  const { dir, raw } = await images(t);
  t.is(await sameVerdict(t, path.join(dir, 'missing.raw'), raw), 2);
  t.is(await sameVerdict(t, '-f', 'qcow2', raw, raw), 2);
  t.is(await sameVerdict(t, raw), 1);
  t.is(await sameVerdict(t, '-x', raw, raw), 1);
  const ours = await qcow2Cli('compare', raw, path.join(dir, 'missing.raw'));
  t.regex(ours.stderr, /Could not open '.*missing\.raw'/);
});

test('-p prints progress lines around the verdict, and -q silences both', async (t) => {
  const { dir, qcow, raw } = await images(t);
  const line = String.raw`    \(\d{1,3}\.\d\d/100%\)\r`;
  const theirs = await runProgram('qemu-img', ['compare', '-p', qcow, raw]);
  const ours = await qcow2Cli('compare', '-p', qcow, raw);
  const identical = new RegExp(String.raw`^    \(0\.00/100%\)\r(${line})*    \(100\.00/100%\)\rImages are identical\.\n\n$`);
  t.regex(theirs.stdout, identical);
  t.regex(ours.stdout, identical);
  const other = path.join(dir, 'b.raw');
  await writeFile(other, patternBytes(6 << 20, 5));
  const mismatch = /^ {4}\(0\.00\/100%\)\rContent mismatch at offset 0!\n\n$/;
  t.regex((await runProgram('qemu-img', ['compare', '-p', qcow, other])).stdout, mismatch);
  t.regex((await qcow2Cli('compare', '-p', qcow, other)).stdout, mismatch);
  t.is((await qcow2Cli('compare', '-p', '-q', qcow, other)).stdout, '');
  const longer = path.join(dir, 'long.raw');
  await copyFile(raw, longer);
  await truncate(longer, 8 << 20);
  await qemuIo('-f', 'raw', '-c', 'write -P 0 7M 64k', longer);
  const sized = new RegExp(
    String.raw`^    \(0\.00/100%\)\r(${line})*Warning: Image size mismatch!\n(${line})*    \(100\.00/100%\)\rImages are identical\.\n\n$`,
  );
  t.regex((await runProgram('qemu-img', ['compare', '-p', raw, longer])).stdout, sized);
  t.regex((await qcow2Cli('compare', '-p', raw, longer)).stdout, sized);
});

test('library: compareImages reports verdict, offset and size mismatch', async (t) => {
  const { dir, qcow, raw } = await images(t);
  const other = path.join(dir, 'b.raw');
  await copyFile(raw, other);
  await truncate(other, 7 << 20);
  await qemuIo('-f', 'raw', '-c', 'write -P 1 5000000 1', other);
  const a = await open(qcow, { readOnly: true });
  const b = await open(other, { readOnly: true });
  t.teardown(async () => {
    await a.close();
    await b.close();
  });
  let last = 0;
  const result = await compareImages(a, b, { parallel: 3, onProgress: (done) => (last = done) });
  t.deepEqual(result, { identical: false, verdict: 'content', offset: 4999680, sizeMismatch: true });
  t.true(last > 0);
  t.deepEqual(await compareImages(a, b, { strict: true }), { identical: false, verdict: 'size', sizeMismatch: true });
  t.deepEqual(await compareImages(a, a), { identical: true, verdict: 'identical', sizeMismatch: false });
  const controller = new AbortController();
  controller.abort();
  await t.throwsAsync(compareImages(a, b, { signal: controller.signal }), { code: 'ABORT_ERR' });
});

test('strict mode over images of one content built six ways: qemu-img verdicts pair by pair', async (t) => {
  const dir = await tempDir(t);
  const at = (name: string) => path.join(dir, name);
  await qemuImg('create', '-q', '-f', 'qcow2', at('src.qcow2'), '4M');
  await qemuIo('-c', 'write -P 1 0 64k', '-c', 'write -P 2 1M 128k', '-c', 'write -P 3 3M 4k', at('src.qcow2'));
  await qemuImg('convert', '-O', 'raw', at('src.qcow2'), at('sparse.raw'));
  await qemuImg('convert', '-S', '0', '-O', 'raw', at('src.qcow2'), at('full.raw'));
  await qemuImg('convert', '-c', '-O', 'qcow2', at('src.qcow2'), at('compressed.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'src.qcow2', '-F', 'qcow2', at('overlay.qcow2'));
  await qemuIo('-c', 'write -P 2 1M 64k', '-c', 'write -z 2M 64k', at('overlay.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', at('half.qcow2'), '2M');
  await qemuIo('-c', 'write -P 1 0 64k', '-c', 'write -P 2 1M 128k', at('half.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'half.qcow2', '-F', 'qcow2', at('short-backing.qcow2'), '4M');
  await qemuIo('-c', 'write -P 3 3M 4k', at('short-backing.qcow2'));
  const names = ['src.qcow2', 'sparse.raw', 'full.raw', 'compressed.qcow2', 'overlay.qcow2', 'short-backing.qcow2'];
  for (const [i, a] of names.entries()) {
    for (const b of names.slice(i + 1)) {
      t.is(await sameVerdict(t, '-s', at(a), at(b)), 1, `${a} ${b}`);
    }
  }
  t.is(await sameVerdict(t, '-s', at('short-backing.qcow2'), at('short-backing.qcow2')), 0);
  t.is(await sameVerdict(t, at('short-backing.qcow2'), at('full.raw')), 0);
});
