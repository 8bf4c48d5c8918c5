/** `qcow2 info` against `qemu-img info`: the same text, the same JSON, the same errors and exit codes. */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, open, readdir, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes } from '../ts/errors.js';
import { parseHeader, serializeHeader } from '../ts/qcow2/header.js';
import { info, infoChain } from '../ts/tools/info.js';
import { qemuJson, QemuJsonValue, sizeToStr } from '../ts/cli/qemu-format.js';
import { CLI, TEST_ROOT, qcow2Cli, qemuImg, qemuIo } from './helpers/qemu.js';
import { VARIANTS } from './helpers/qcow2-variants.js';

interface Result {
  stdout: string;
  stderr: string;
  code: number;
}

/** Run a program in `cwd` (so that bare relative names can be tested), never throwing for an exit code. */
function runIn(cwd: string, program: string, args: string[]): Promise<Result> {
  return new Promise((resolve, reject) => {
    execFile(program, args, { cwd, encoding: 'utf8', maxBuffer: 1 << 26 }, (error, stdout, stderr) => {
      if (error && typeof error.code !== 'number') reject(error);
      else resolve({ stdout, stderr, code: error ? (error.code as number) : 0 });
    });
  });
}

/** Our program name where qemu-img writes its own. */
function asQemu(stderr: string): string {
  return stderr.replace(/^qcow2: /gm, 'qemu-img: ').replace(/'qcow2 (check -r|--help)'/g, "'qemu-img $1'");
}

/**
 * Write back every file in `dir`: a file system may add blocks (extent metadata) when it writes a
 * fresh file back, which would change "disk size" between the two programs' stat() calls.
 */
async function writeBack(dir: string): Promise<void> {
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    if (!entry.isFile()) continue;
    const handle = await open(path.join(dir, entry.name), 'r');
    await handle.sync();
    await handle.close();
  }
}

/** Run `qemu-img info ARGS` and `qcow2 info ARGS` in `cwd` and require the same output and exit code. */
async function sameAsQemu(t: ExecutionContext, cwd: string, args: string[]): Promise<Result> {
  const [qemu, ours] = await Promise.all([runIn(cwd, 'qemu-img', ['info', ...args]), runIn(cwd, process.execPath, [CLI, 'info', ...args])]);
  t.is(ours.stdout, qemu.stdout, `stdout of info ${args.join(' ')}`);
  t.is(asQemu(ours.stderr), qemu.stderr, `stderr of info ${args.join(' ')}`);
  t.is(ours.code, qemu.code, `exit code of info ${args.join(' ')}`);
  if (qemu.code === 0 && args.includes('--output=json')) t.deepEqual(JSON.parse(ours.stdout), JSON.parse(qemu.stdout));
  return qemu;
}

/** Both outputs, with and without --backing-chain, once the image's folder is written back. */
async function allOutputsSame(t: ExecutionContext, cwd: string, image: string): Promise<void> {
  await writeBack(path.dirname(path.resolve(cwd, image)));
  for (const output of ['--output=human', '--output=json']) {
    await sameAsQemu(t, cwd, [output, image]);
    await sameAsQemu(t, cwd, [output, '--backing-chain', image]);
  }
}

let root: string;

test.before(async () => {
  root = await mkdtemp(path.join(TEST_ROOT, 'qcow2-info-'));
});

test.after.always(() => rm(root, { recursive: true, force: true }));

/** A fresh folder under the shared root. */
async function folder(name: string): Promise<string> {
  const dir = path.join(root, name.replace(/[^a-z0-9]+/gi, '-'));
  await mkdir(dir, { recursive: true });
  return dir;
}

for (const variant of VARIANTS) {
  test(`info equals qemu-img: ${variant.name}`, async (t) => {
    const dir = await folder(variant.name);
    const file = await variant.make(dir);
    // By bare name in its folder, by a relative path with a folder part, and by absolute path.
    await allOutputsSame(t, dir, path.basename(file));
    await allOutputsSame(t, root, path.relative(root, file));
    await sameAsQemu(t, '/', ['--output=human', '--backing-chain', file]);
    const qemu = JSON.parse(await qemuImg('info', '--output=json', file));
    t.deepEqual(JSON.parse(qemuJson((await info(file)) as unknown as QemuJsonValue)), qemu);
    const chain = await infoChain(file);
    if (variant.chain) t.true(chain.length > 1);
    else t.is(chain.length, 1);
  });
}

test('info equals qemu-img: data written, compressed clusters, raw files of odd sizes', async (t) => {
  const dir = await folder('data');
  const qcow = path.join(dir, 'data.qcow2');
  await qemuImg('create', '-f', 'qcow2', qcow, '1152M');
  await qemuIo('-c', 'write -P 7 0 3M', '-c', 'write -c 8M 64k', qcow);
  await allOutputsSame(t, dir, 'data.qcow2');
  for (const size of [0, 50, 1000, 1023488, 1024000, 10240000]) {
    const raw = path.join(dir, `r${size}.img`);
    await writeFile(raw, Buffer.alloc(Math.min(size, 4096), 1));
    await truncate(raw, size);
    await allOutputsSame(t, dir, path.basename(raw));
    await sameAsQemu(t, dir, ['-f', 'raw', path.basename(raw)]);
  }
  await sameAsQemu(t, dir, ['-f', 'raw', 'data.qcow2']);
  await sameAsQemu(t, dir, ['--format=qcow2', '-U', 'data.qcow2']);
});

test('info equals qemu-img: dirty and corrupt images, data file bit without a name, inconsistent bitmaps', async (t) => {
  const dir = await folder('flags');
  const make = async (name: string, edit: (b: Buffer) => void, ...setup: string[][]) => {
    const file = path.join(dir, name);
    await qemuImg('create', '-f', 'qcow2', file, '3M');
    for (const args of setup) await qemuImg(...args, file, ...(args[0] === 'bitmap' ? ['bm'] : []));
    const bytes = await readFile(file);
    edit(bytes);
    await writeFile(file, bytes);
    return name;
  };
  await allOutputsSame(t, dir, await make('dirty.qcow2', (b) => (b[79] |= 1)));
  await allOutputsSame(t, dir, await make('corrupt.qcow2', (b) => (b[79] |= 2)));
  await allOutputsSame(t, dir, await make('nodatafile.qcow2', (b) => (b[79] |= 4)));
  await allOutputsSame(t, dir, await make('rawbit.qcow2', (b) => (b[95] |= 2)));
  const nameOnly = (b: Buffer) => serializeHeader({ ...parseHeader(b, b.length), dataFile: 'elsewhere.raw' }).copy(b);
  await allOutputsSame(t, dir, await make('namenobit.qcow2', nameOnly));
  await allOutputsSame(t, dir, await make('bitmaps-stale.qcow2', (b) => (b[95] &= ~1), ['bitmap', '--add']));
  const setInUse = (b: Buffer) => {
    const directory = parseHeader(b, b.length).bitmaps!.bitmapDirectoryOffset;
    b[directory + 15] |= 1;
  };
  await allOutputsSame(t, dir, await make('bitmaps-inuse.qcow2', setInUse, ['bitmap', '--add']));
  const size = await make('size1000.qcow2', (b) => b.writeBigUInt64BE(1000n, 24));
  await allOutputsSame(t, dir, size);
});

test('info equals qemu-img: snapshot and bitmap names that JSON must escape', async (t) => {
  const dir = await folder('names');
  const file = path.join(dir, 'names.qcow2');
  await qemuImg('create', '-f', 'qcow2', file, '1M');
  for (const name of ['tab\there', 'new\nline', 'ctl\x01\x7f', 'emoji 😀 ok', 'x'.repeat(40), 'back\\slash "q" /s']) {
    await qemuImg('snapshot', '-c', name, file);
  }
  await qemuImg('bitmap', '--add', file, 'é bitmap');
  await allOutputsSame(t, dir, 'names.qcow2');
  // Names that are not UTF-8 (qemu-img prints their bytes, and JSON-escapes them its own way).
  await qemuImg('snapshot', '-c', 'SNAPNAME-0123', file);
  await qemuImg('bitmap', '--add', file, 'BITMAPNAME');
  const bytes = await readFile(file);
  Buffer.from([0x61, 0xe2, 0x82, 0x78, 0xc0, 0x80, 0xff, 0x62, 0xed, 0xa0, 0x80, 0xf4, 0x90]).copy(bytes, bytes.indexOf('SNAPNAME-0123'));
  Buffer.from([0xf0, 0x9f, 0x98, 0x80, 0xc3, 0x28, 0x80, 0xf8, 0x41, 0xe9]).copy(bytes, bytes.indexOf('BITMAPNAME'));
  await writeFile(file, bytes);
  await allOutputsSame(t, dir, 'names.qcow2');
});

test('info equals qemu-img: snapshots with VM state, VM clock, no icount and a huge icount', async (t) => {
  const dir = await folder('vmstate');
  const file = path.join(dir, 'vm.qcow2');
  await qemuImg('create', '-f', 'qcow2', file, '1M');
  await qemuImg('snapshot', '-c', 'one', file);
  await qemuImg('snapshot', '-c', 'two', file);
  const b = await readFile(file);
  let at = Number(b.readBigUInt64BE(64));
  b.writeBigUInt64BE(3723456789012n, at + 24); // 01:02:03.456
  b.writeUInt32BE(0, at + 16);
  b.writeUInt32BE(999999999, at + 20);
  b.writeBigUInt64BE(1234567890n, at + 40); // VM state size (64-bit extra field)
  b.writeBigUInt64BE(0xffffffffffffffffn, at + 56); // icount -1: not recorded
  at += Math.ceil((40 + b.readUInt32BE(at + 36) + b.readUInt16BE(at + 12) + b.readUInt16BE(at + 14)) / 8) * 8;
  b.writeBigUInt64BE(360000000000000n, at + 24); // 100 hours
  b.writeBigUInt64BE(5n << 40n, at + 40);
  b.writeBigUInt64BE((1n << 60n) + 1n, at + 56);
  await writeFile(file, b);
  await allOutputsSame(t, dir, 'vm.qcow2');
  const [first, second] = (await info(file)).snapshots!;
  t.is(first.icount, undefined);
  t.is(second.icount, (1n << 60n) + 1n);
});

test('info equals qemu-img: a backing file without a recorded format is probed', async (t) => {
  const dir = await folder('probed');
  await qemuImg('create', '-f', 'raw', path.join(dir, 'base.raw'), '2M');
  const file = path.join(dir, 'over.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', file);
  const bytes = await readFile(file);
  const header = parseHeader(bytes, bytes.length);
  header.backingFormat = undefined;
  serializeHeader(header).copy(bytes);
  await writeFile(file, bytes);
  await allOutputsSame(t, dir, 'over.qcow2');
});

test('info equals qemu-img: backing names with a protocol are not combined with the image folder', async (t) => {
  const dir = await folder('protocols');
  await mkdir(path.join(dir, 'sub'));
  await qemuImg('create', '-f', 'qcow2', path.join(dir, 'base.qcow2'), '1M');
  await qemuImg('create', '-f', 'qcow2', '-u', '-b', 'file:base.qcow2', '-F', 'qcow2', path.join(dir, 'sub', 'file.qcow2'), '1M');
  await qemuImg('create', '-f', 'qcow2', '-u', '-b', 'nbd://localhost:1/x', '-F', 'raw', path.join(dir, 'sub', 'nbd.qcow2'), '1M');
  await writeBack(dir);
  await writeBack(path.join(dir, 'sub'));
  for (const output of ['--output=human', '--output=json']) {
    await sameAsQemu(t, dir, [output, 'sub/nbd.qcow2']);
    await sameAsQemu(t, dir, [output, 'sub/file.qcow2']);
    // "file:base.qcow2" is opened from the working directory, like qemu-img does.
    await sameAsQemu(t, dir, [output, '--backing-chain', 'sub/file.qcow2']);
  }
  const nbd = await runIn(dir, process.execPath, [CLI, 'info', '--backing-chain', 'sub/nbd.qcow2']);
  t.is(nbd.code, 1);
  t.is(nbd.stderr, "qcow2: Could not open 'nbd://localhost:1/x': protocol 'nbd' is not supported\n");
});

test('info equals qemu-img: errors', async (t) => {
  const dir = await folder('errors');
  await qemuImg('create', '-f', 'raw', path.join(dir, 'plain.img'), '1M');
  await qemuImg('create', '-f', 'qcow2', path.join(dir, 'good.qcow2'), '1M');
  await qemuImg('create', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', path.join(dir, 'orphan.qcow2'), '1M');
  await qemuImg('create', '-f', 'qcow2', '-u', '-b', 'plain.img', '-F', 'qcow2', path.join(dir, 'wrongfmt.qcow2'), '1M');
  const unknown = await readFile(path.join(dir, 'good.qcow2'));
  unknown[75] = 1;
  await writeFile(path.join(dir, 'unknown.qcow2'), unknown);
  const named = Buffer.from(unknown);
  named[0x79] = 32; // the "dirty bit" entry of the feature name table now names bit 32
  await writeFile(path.join(dir, 'named.qcow2'), named);
  for (const args of [
    ['missing.qcow2'],
    ['-f', 'qcow2', 'plain.img'],
    ['-f', 'nosuchformat', 'good.qcow2'],
    ['unknown.qcow2'],
    ['named.qcow2'],
    ['--backing-chain', 'orphan.qcow2'],
    ['--backing-chain', '--output=json', 'wrongfmt.qcow2'],
    ['--output=xml', 'good.qcow2'],
    [],
    ['good.qcow2', 'plain.img'],
    ['-f'],
    ['--output'],
    ['--nosuchoption', 'good.qcow2'],
    ['-Ux', 'good.qcow2'],
  ]) {
    const r = await sameAsQemu(t, dir, args);
    t.is(r.code, 1, args.join(' '));
  }
  // Without --backing-chain the missing backing file does not matter.
  await writeBack(dir);
  await sameAsQemu(t, dir, ['orphan.qcow2']);
});

test('info: messages for malformed headers name the file, the value and the bound', async (t) => {
  const dir = await folder('malformed');
  const file = path.join(dir, 'bad.qcow2');
  await qemuImg('create', '-f', 'qcow2', file, '1M');
  const bytes = await readFile(file);
  bytes.writeUInt32BE(23, 20);
  await writeFile(file, bytes);
  const r = await runIn(dir, process.execPath, [CLI, 'info', 'bad.qcow2']);
  t.is(r.code, 1);
  t.is(r.stdout, '');
  t.is(r.stderr, "qcow2: Could not open 'bad.qcow2': cluster_bits 23 is outside 9..21\n");
  await t.throwsAsync(info(file), { code: ErrorCodes.INVALID_HEADER, message: `Could not open '${file}': cluster_bits 23 is outside 9..21` });
  const encrypted = path.join(dir, 'enc.qcow2');
  bytes.writeUInt32BE(16, 20);
  bytes.writeUInt32BE(2, 32);
  await writeFile(encrypted, bytes);
  await t.throwsAsync(info(encrypted), { code: ErrorCodes.ENCRYPTED, message: /encrypted images are not supported/ });
});

test('info --backing-chain refuses loops and over-deep chains (qemu-img 7.2 would hang)', async (t) => {
  const dir = await folder('loops');
  await qemuImg('create', '-f', 'qcow2', path.join(dir, 'a.qcow2'), '1M');
  await qemuImg('create', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', path.join(dir, 'b.qcow2'));
  await qemuImg('create', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', path.join(dir, 'c.qcow2'));
  t.is((await infoChain(path.join(dir, 'c.qcow2'))).length, 3);
  await t.throwsAsync(infoChain(path.join(dir, 'c.qcow2'), { maxChainDepth: 2 }), {
    code: ErrorCodes.CHAIN_TOO_DEEP,
    message: `backing chain of '${path.join(dir, 'c.qcow2')}' is deeper than 2 images`,
  });
  await qemuImg('rebase', '-u', '-b', 'c.qcow2', '-F', 'qcow2', path.join(dir, 'a.qcow2'));
  const loop = await runIn(dir, process.execPath, [CLI, 'info', '--backing-chain', 'c.qcow2']);
  t.is(loop.code, 1);
  t.is(loop.stdout, '');
  t.is(loop.stderr, "qcow2: Backing file loop: 'a.qcow2' has backing file 'c.qcow2', which is already in the chain\n");
  await qemuImg('create', '-f', 'qcow2', '-u', '-b', 'self.qcow2', '-F', 'qcow2', path.join(dir, 'self.qcow2'), '1M');
  await t.throwsAsync(infoChain(path.join(dir, 'self.qcow2')), { code: ErrorCodes.BACKING_LOOP });
  // The same file by another name is still a loop.
  await qemuImg('rebase', '-u', '-b', `../${path.basename(dir)}/c.qcow2`, '-F', 'qcow2', path.join(dir, 'a.qcow2'));
  await t.throwsAsync(infoChain(path.join(dir, 'c.qcow2')), { code: ErrorCodes.BACKING_LOOP, message: /\(as '.*\/c\.qcow2'\)$/ });
  // Without --backing-chain a looping image is an ordinary image.
  await writeBack(dir);
  await sameAsQemu(t, dir, ['--output=json', 'c.qcow2']);
});

test('qcow2Cli info: the JSON and text of qemu-img for an image by absolute path', async (t) => {
  const dir = await folder('cli');
  const file = path.join(dir, 'abs.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=4k,lazy_refcounts=on', file, '20G');
  for (const args of [['info', file], ['info', '--output=json', file], ['info', '--output', 'json', '--backing-chain', file]]) {
    const ours = await qcow2Cli(...args);
    t.is(ours.code, 0, ours.stderr);
    t.is(ours.stdout, await qemuImg(...args));
  }
  const help = await qcow2Cli('info', '--help');
  t.is(help.code, 0);
  t.regex(help.stdout, /^usage: qcow2 info /);
});

test('sizeToStr writes sizes like qemu-img', (t) => {
  const cases: [number, string][] = [
    [0, '0 B'],
    [999, '999 B'],
    [1000, '0.977 KiB'],
    [1536, '1.5 KiB'],
    [200704, '196 KiB'],
    [1023488, '1e+03 KiB'],
    [1207959552, '1.12 GiB'],
    [1 << 30, '1 GiB'],
    [2 ** 53, '8 PiB'],
  ];
  for (const [bytes, text] of cases) t.is(sizeToStr(bytes), text, String(bytes));
});
