/** `qcow2 io` against qemu-io: the same command sequences on twin images give the same output, exit code and image. */
import { spawn } from 'node:child_process';
import { copyFile, readFile, readdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { cvtstr, dumpBuffer, parseNumber, parsePattern, printfFixed, report, timestr } from '../ts/tools/io/format.js';
import { CLI, RunResult, qcow2Cli, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';

/** Timing figures differ from run to run: mask them, keeping the shape of the line. */
function maskTimes(text: string): string {
  return text
    .replace(/^(.*, \d+ ops; )(\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) \(\d+(\.\d+)? (bytes|[KMGTPE]iB)\/sec and \d+\.\d{4} ops\/sec\)$/gm, '$1TIME')
    .replace(/^(\d+,\d+,)\d+:\d\d:\d\d\.\d\d,\d+\.\d{3},\d+\.\d{3}$/gm, '$1CSV');
}

/** stderr with the program prefix made neutral. */
function neutralErr(text: string): string {
  return text.replace(/^(qemu-io|qcow2): /gm, 'PROG: ');
}

/** Run `qemu-io args… a` and `qcow2 io args… b`; assert the same masked stdout, stderr and exit code. */
async function sameRun(t: ExecutionContext, a: string, b: string, args: string[], label = args.join(' ')): Promise<RunResult> {
  const theirs = await runProgram('qemu-io', [...args, a]);
  const ours = await qcow2Cli('io', ...args, b);
  t.is(maskTimes(ours.stdout), maskTimes(theirs.stdout), `stdout of ${label}`);
  t.is(neutralErr(ours.stderr).replaceAll(b, a), neutralErr(theirs.stderr), `stderr of ${label}`);
  t.is(ours.code, theirs.code, `exit code of ${label}`);
  return ours;
}

/** The -c arguments for `commands`. */
function cmds(...commands: string[]): string[] {
  return commands.flatMap((c) => ['-c', c]);
}

/** Two copies of a fresh image made by `make`. */
async function twins(t: ExecutionContext, make: (file: string) => Promise<unknown>, name = 'disk.img'): Promise<[string, string]> {
  const dir = await tempDir(t);
  const a = path.join(dir, `a-${name}`);
  const b = path.join(dir, `b-${name}`);
  await make(a);
  await copyFile(a, b);
  return [a, b];
}

async function assertSameImages(t: ExecutionContext, a: string, b: string, format: string): Promise<void> {
  const r = await runProgram('qemu-img', ['compare', '-f', format, '-F', format, a, b]);
  t.is(r.code, 0, `qemu-img compare: ${r.stdout}${r.stderr}`);
}

const rawTwins = (t: ExecutionContext, size = '1M') => twins(t, (f) => qemuImg('create', '-f', 'raw', f, size));

test('raw: writes, reads, patterns, dumps and statistics as qemu-io prints them; the images end up identical', async (t) => {
  const [a, b] = await rawTwins(t);
  await sameRun(t, a, b, [
    '-f',
    'raw',
    ...cmds(
      'write 0 64k',
      'write -P 0xab 512 1k',
      'read -v 500 40',
      'read -P 0xab 512 1k',
      'read -P 0xab -s 512 -l 512 0 1k',
      'readv 0 512 1k',
      'writev -P 3 4k 512 1k',
      'readv -P 3 -v 4k 1k 512',
      'write -P 010 100k 3',
      'read -P 8 100k 3',
      'w -P 0x41 200k 16',
      'r -v 200k 17',
      'read -C 0 1k',
      'write -Cq 0 1',
      'discard 64k 4k',
      'write -z 8k 4k',
      'write -zu 12k 4k',
      'write -f 20k 512',
      'flush',
      'length',
      'l',
      'info',
      'map',
      'alloc 0',
      'alloc 0 128k',
      'alloc 1M',
      'alloc 100 3',
      'read 0 0',
      'read 0 1.5k',
      'read 0x10 010',
      'read 0 0.5M',
      'read -q 0 1',
      'truncate 2M',
      'length',
      'read -P 0 1M 1M',
      'truncate 768k',
      'length',
      'truncate -m falloc 1536k',
      'truncate -m metadata 2M',
      'truncate -m full 2M',
      'length',
      'map',
    ),
  ]);
  await assertSameImages(t, a, b, 'raw');
});

test('probed raw images: a write that would make the first sector a qcow2 header is refused (EPERM)', async (t) => {
  const [a, b] = await rawTwins(t);
  const magic = path.join(path.dirname(a), 'magic.bin');
  await writeFile(magic, Buffer.from('514649fb00000003', 'hex'));
  const steps = cmds(`write -s ${magic} 0 512`, 'write -P 0x51 0 512', `write -s ${magic} 512 8`, `write -s ${magic} 1 8`, 'read -v 0 16');
  await sameRun(t, a, b, steps);
  await assertSameImages(t, a, b, 'raw');
  const explicit = await qcow2Cli('io', '-f', 'raw', '-c', `write -s ${magic} 0 512`, b);
  t.is(explicit.code, 0, explicit.stdout);
  t.is((await readFile(b)).readUInt32BE(0), 0x514649fb);
});

test('raw: -v dumps every byte value as qemu-io does (letters and digits shown, the rest as dots)', async (t) => {
  const [a, b] = await rawTwins(t);
  const source = path.join(path.dirname(a), 'bytes.bin');
  await writeFile(source, Buffer.from(Array.from({ length: 256 }, (_, i) => i)));
  await sameRun(t, a, b, ['-f', 'raw', ...cmds(`write -s ${source} 0 300`, 'read -v 0 320', 'read -v 1 16', 'read -v 3 5')]);
  await assertSameImages(t, a, b, 'raw');
});

test('failures: the same messages on the same stream, and exit code 1 once any command failed', async (t) => {
  const [a, b] = await rawTwins(t);
  const failing = [
    'read 1M 1',
    'read 0 2M',
    'read -P 0xab 0 1k',
    'bogus',
    'read',
    'read x 1',
    'read 0 1x',
    'read 0 1.5',
    'read 0 1kb',
    'read 0 1e',
    'read 1e 1',
    'read 8e 1',
    'write 0x7fffffffffff0000 1',
    'discard 1G 1',
    'read 0 3G',
    'read -k 0 1',
    'read 0 -1',
    'read 0 1 2',
    'read -s 0 0 1',
    'read -P',
    'read -P 1 -l 2000 0 1k',
    'read -s 5 -P 0 0 1',
    'read -b 1 512',
    'read -b 0 512',
    'write -P 0x1ff 0 1',
    'write -P abc 0 1',
    'write -P 0x-1 0 1',
    'write -u 0 512',
    'write -n 0 512',
    'write -z -P 3 0 1',
    'write -bz 0 512',
    'write -c 1 512',
    'write -c 512 1',
    'write -c 0 64k',
    'write 1M 1',
    'writev 0 512 x',
    'readv 0',
    'readv 0 3G',
    'readv 1M 1',
    'discard 1M 1',
    'alloc -1',
    'alloc 0 1 2',
    'length 1',
    'truncate',
    'truncate -m bogus 1M',
    'aio_write -z 0 1 1',
    'aio_write -u 0 1',
    `open ${a}`,
    'help read x',
  ];
  await sameRun(t, a, b, ['-f', 'raw', ...cmds(...failing)], 'a sequence of failing commands');
  for (const command of ['read 1M 1', 'bogus', 'read -P 1 0 1', 'write -c 0 64k']) {
    await sameRun(t, a, b, ['-f', 'raw', '-c', command]);
  }
  await assertSameImages(t, a, b, 'raw');
});

test('read-only images refuse writes with "Block node is read-only"; reads still work', async (t) => {
  const [a, b] = await rawTwins(t);
  await sameRun(t, a, b, ['-r', '-f', 'raw', ...cmds('write 0 1', 'discard 0 1', 'write -z 0 1', 'aio_write 0 1', 'truncate 2M', 'read 0 1', 'flush')]);
});

test('asynchronous requests: aio_read and aio_write report when they complete, aio_flush waits', async (t) => {
  const [a, b] = await rawTwins(t);
  const steps = ['aio_write -P 5 0 4k 4k', 'aio_flush', 'aio_read -P 5 0 8k', 'aio_flush', 'aio_read -v 0 16', 'aio_flush'];
  steps.push('aio_read -P 6 0 16', 'aio_flush', 'aio_read 1M 1', 'aio_flush', 'aio_write 1M 1', 'aio_flush', 'aio_read -q 0 16');
  await sameRun(t, a, b, ['-f', 'raw', ...cmds(...steps)]);
  await assertSameImages(t, a, b, 'raw');
});

test('open and close within a session; commands without an open file say so', async (t) => {
  const [a, b] = await rawTwins(t);
  const theirs = await runProgram('qemu-io', cmds('length', 'close', `open -o driver=raw ${a}`, 'length', 'close', 'close', `open -r -o driver=raw ${a}`, 'write 0 1', 'read 0 1'));
  const ours = await qcow2Cli('io', ...cmds('length', 'close', `open -o driver=raw ${b}`, 'length', 'close', 'close', `open -r -o driver=raw ${b}`, 'write 0 1', 'read 0 1'));
  t.is(maskTimes(ours.stdout), maskTimes(theirs.stdout));
  t.is(neutralErr(ours.stderr), neutralErr(theirs.stderr));
  t.is(ours.code, theirs.code);
  const reopen = cmds('reopen -r', 'write 0 1', 'reopen -w', 'write 0 1', 'reopen -r -w', 'reopen -c bad', 'reopen -c none', 'reopen x');
  await sameRun(t, a, b, ['-f', 'raw', ...reopen, ...cmds('reopen -o x=y', 'read -P 0xcd 0 1', 'close', 'reopen')]);
  await sameRun(t, a, b, ['-r', ...cmds('reopen', 'write 0 1', 'reopen -c writeback', 'reopen -w -c unsafe', 'write -P 3 0 1')]);
  await assertSameImages(t, a, b, 'raw');
  const missing = path.join(path.dirname(a), 'missing.img');
  await sameRun(t, missing, missing, ['-f', 'raw', '-c', 'length']);
  await sameRun(t, a, a, ['-f', 'bogus', '-c', 'length']);
  const dir = path.dirname(a);
  await sameRun(t, dir, dir, ['-c', 'length']);
  await sameRun(t, missing, missing, ['-c', 'length']);
  const orphan = path.join(dir, 'orphan.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-u', '-b', path.join(dir, 'gone.qcow2'), '-F', 'qcow2', orphan, '1M');
  await sameRun(t, orphan, orphan, ['-c', 'length']);
  const garbage = path.join(dir, 'garbage.qcow2');
  await writeFile(garbage, 'not an image');
  await sameRun(t, garbage, garbage, ['-f', 'qcow2', '-c', 'length']);
});

test('quit stops a -c sequence', async (t) => {
  const [a, b] = await rawTwins(t);
  await sameRun(t, a, b, ['-f', 'raw', ...cmds('length', 'quit', 'read 1M 1', 'length')]);
  await sameRun(t, a, b, ['-f', 'raw', ...cmds('q', 'bogus')]);
  await sameRun(t, a, b, ['-f', 'raw', ...cmds('sleep 10', 'sleep x', 'sleep 1k', 'sleep', 'length')]);
});

/** Run a program with `input` on stdin. */
function runWithInput(program: string, args: string[], input: string): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(program, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ stdout, stderr, code: code ?? -1 }));
    child.stdin.end(input);
  });
}

test('interactive mode: a prompt per line from stdin, quit ends it, any failure makes the exit code 1', async (t) => {
  const [a, b] = await rawTwins(t);
  const inputs = ['write -P 7 0 4k\nread -P 7 0 4k\n\nbogus\nread 1M 1\nlength\nquit\nlength\n', 'length\nalloc 0', '', '  length  \nlength\t\n'];
  for (const input of inputs) {
    const theirs = await runWithInput('qemu-io', ['-f', 'raw', a], input);
    const ours = await runWithInput(process.execPath, [CLI, 'io', '-f', 'raw', b], input);
    t.is(maskTimes(ours.stdout), maskTimes(theirs.stdout), JSON.stringify(input));
    t.is(neutralErr(ours.stderr), neutralErr(theirs.stderr));
    t.is(ours.code, theirs.code);
  }
  await assertSameImages(t, a, b, 'raw');
});

/** A qcow2 overlay over a qcow2 backing file: data in both layers, zero clusters, a compressed cluster. */
async function qcow2Chain(t: ExecutionContext): Promise<string> {
  const dir = await tempDir(t);
  const base = path.join(dir, 'base.qcow2');
  const top = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-f', 'qcow2', base, '4M');
  await qemuIo('-f', 'qcow2', '-c', 'write -P 1 0 128k', '-c', 'write -z 1M 64k', base);
  await qemuImg('create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
  await qemuIo('-f', 'qcow2', ...cmds('write -P 2 64k 64k', 'write -z 2M 64k', 'write -P 3 3M 1k', 'write -c -P 4 1536k 64k'), top);
  return top;
}

test('qcow2 with a backing file: map, alloc, info, length and pattern reads as qemu-io prints them', async (t) => {
  const top = await qcow2Chain(t);
  const reads = cmds(
    'map',
    'alloc 0 4M',
    'alloc 0',
    'alloc 64k 64k',
    'alloc 1M 64k',
    'alloc 2M 1M',
    'alloc 100 200k',
    'alloc 3M 2M',
    'info',
    'length',
    'read -P 1 0 64k',
    'read -P 2 64k 64k',
    'read -P 4 1536k 64k',
    'read -v 3M 32',
    'read -P 0 1M 64k',
    'read -P 0 2M 64k',
    'read -P 1 0 128k',
    'readv -P 0 2M 4k 4k',
    'aio_read -P 3 3M 1k',
    'aio_flush',
    'read 4M 1',
  );
  await sameRun(t, top, top, ['-r', '-f', 'qcow2', ...reads]);
  await sameRun(t, top, top, ['-r', ...reads]);
});

test('qcow2 v2 image and an extended-L2 image: info shows their format-specific block and VM state offset', async (t) => {
  const dir = await tempDir(t);
  const v2 = path.join(dir, 'v2.qcow2');
  const ext = path.join(dir, 'ext.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4096', v2, '3G');
  await qemuImg('create', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', ext, '5G');
  for (const file of [v2, ext]) await sameRun(t, file, file, ['-r', '-f', 'qcow2', ...cmds('info', 'map', 'length')]);
});

test('a corrupt table met by map, alloc or read is reported and the session goes on', async (t) => {
  const file = path.join(await tempDir(t), 'corrupt.qcow2');
  await qemuImg('create', '-f', 'qcow2', file, '4M');
  await qemuIo('-f', 'qcow2', '-c', 'write 0 64k', file);
  const image = await readFile(file);
  const l1 = Number(image.readBigUInt64BE(40));
  image.writeBigUInt64BE((1n << 63n) | (1n << 40n), l1);
  await writeFile(file, image);
  const r = await qcow2Cli('io', '-r', '-f', 'qcow2', ...cmds('map', 'alloc 0', 'read 0 1', 'length'), file);
  t.is(r.stdout, 'read failed: Input/output error\n4 MiB\n');
  t.regex(r.stderr, /^qcow2: L1 entry 0 .*past the end of the image file.*\nqcow2: L1 entry 0 .*\n$/);
  t.is(r.code, 1);
});

test('number syntax: suffixes, hex, fractions only with a unit', (t) => {
  t.is(parseNumber('512'), 512);
  t.is(parseNumber('010'), 10);
  t.is(parseNumber('0x10'), 16);
  t.is(parseNumber('1k'), 1024);
  t.is(parseNumber('1.5K'), 1536);
  t.is(parseNumber('1.6k'), 1638);
  t.is(parseNumber('2M'), 2 << 20);
  t.is(parseNumber('1b'), 1);
  t.is(parseNumber('1e'), 2 ** 60);
  for (const bad of ['1.5', 'x', '1kb', '-1', '', '1.5b']) {
    t.throws(() => parseNumber(bad), { message: `Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${bad}` });
  }
  t.throws(() => parseNumber('8e'), { message: 'Parsing error: argument too large -- 8e' });
  t.is(parsePattern('0xff'), 255);
  t.is(parsePattern('010'), 8);
  t.is(parsePattern('0'), 0);
  for (const bad of ['256', '0x-1', 'a', '1a', '', '08']) t.throws(() => parsePattern(bad), { message: `${bad} is not a valid pattern byte` });
});

test('size, time and statistics formats', (t) => {
  t.is(cvtstr(0), '0 bytes');
  t.is(cvtstr(40), '40 bytes');
  t.is(cvtstr(482.21053), '482.210530 bytes');
  t.is(cvtstr(1024), '1 KiB');
  t.is(cvtstr(1536), '1.500 KiB');
  t.is(cvtstr(2162688), '2.062 MiB');
  t.is(cvtstr(2 ** 40), '1 TiB');
  t.is(printfFixed(2.0625, 3), '2.062');
  t.is(printfFixed(2.0635, 3), '2.063');
  t.is(printfFixed(0.5, 0), '0');
  t.is(printfFixed(1.5, 0), '2');
  t.is(printfFixed(0.125, 2), '0.12');
  t.is(printfFixed(0.375, 2), '0.38');
  t.is(printfFixed(99.9996, 3), '100.000');
  t.is(timestr(0.05), '00.05 sec');
  t.is(timestr(12.345), '12.35 sec');
  t.is(timestr(2128.85), '0:35:28.85');
  t.is(timestr(3725.5), '1:02:05.50');
  t.is(timestr(0.004, true), '0:00:00.00');
  t.is(report('read', 0, 1024, 1, 0.5, false), 'read 1024/1024 bytes at offset 0\n1 KiB, 1 ops; 00.50 sec (2 KiB/sec and 2.0000 ops/sec)\n');
  t.is(report('wrote', 0, 1024, 1, 0.5, true), '1024,1,0:00:00.50,2048.000,2.000\n');
  t.is(dumpBuffer(Buffer.from('0a ~Z'), 0x10), '00000010:  30 61 20 7e 5a  0a..Z\n');
});

/** Twin qcow2 images: a fresh one, or an overlay over a backing file with data (for copy-on-write). */
async function qcow2Twins(t: ExecutionContext, withBacking: boolean, options = 'cluster_size=64k'): Promise<[string, string]> {
  const dir = await tempDir(t);
  let backingArgs: string[] = [];
  if (withBacking) {
    const base = path.join(dir, 'base.qcow2');
    await qemuImg('create', '-f', 'qcow2', base, '4M');
    await qemuIo('-f', 'qcow2', '-c', 'write -P 9 0 4M', base);
    backingArgs = ['-b', base, '-F', 'qcow2'];
  }
  return twins(t, (f) => qemuImg('create', '-f', 'qcow2', '-o', options, ...backingArgs, f, '4M'), 'disk.qcow2');
}

const QCOW2_WRITES = [
  'write -P 1 0 64k',
  'write -P 2 100k 10k',
  'write -z 256k 64k',
  'write -zu 320k 64k',
  'discard 0 64k',
  'writev -P 3 1M 4k 4k',
  'aio_write -P 4 2M 64k',
  'aio_flush',
  'write -c -P 5 3M 64k',
  'write -c 3M 1k',
  'read -P 5 3M 64k',
  'read -P 2 100k 10k',
  'flush',
  'write 4M 1',
  'map',
  'alloc 0 4M',
  'truncate 8M',
  'length',
  'write -P 6 7M 64k',
  'truncate 1000',
  'truncate 6M',
  'read -P 6 7M 1',
  'length',
];

for (const withBacking of [false, true]) {
  test(`qcow2 writes${withBacking ? ' over a backing file' : ''}: the same output as qemu-io, identical images, a clean check`, async (t) => {
    const [a, b] = await qcow2Twins(t, withBacking);
    await sameRun(t, a, b, ['-f', 'qcow2', ...cmds(...QCOW2_WRITES)]);
    await assertSameImages(t, a, b, 'qcow2');
    const check = await runProgram('qemu-img', ['check', b]);
    t.is(check.code, 0, check.stdout + check.stderr);
  });
}

test('qcow2 writes with 4 KiB and 2 MiB clusters, 1-bit refcounts with lazy refcounts, zstd compression', async (t) => {
  const writes = [...QCOW2_WRITES.slice(0, 16), 'write -z 400k 1k', 'discard 100k 4k', 'write -P 7 3M 512', 'map'];
  for (const options of ['cluster_size=4k', 'cluster_size=2M', 'refcount_bits=1,lazy_refcounts=on', 'compression_type=zstd']) {
    const [a, b] = await qcow2Twins(t, false, options);
    await sameRun(t, a, b, ['-f', 'qcow2', ...cmds(...writes)], options);
    await assertSameImages(t, a, b, 'qcow2');
    const check = await runProgram('qemu-img', ['check', b]);
    t.is(check.code, 0, check.stdout + check.stderr);
  }
});

test('snapshot mode (-s, open -s): writes go to a temporary overlay and the image is left as it was', async (t) => {
  const [a, b] = await twins(t, async (f) => {
    await qemuImg('create', '-q', '-f', 'qcow2', f, '1M');
    await qemuIo('-c', 'write -P 1 0 64k', f);
  }, 'disk.qcow2');
  const before = await readFile(b);
  const session = cmds('write -P 2 0 4k', 'read -P 2 0 4k', 'read -P 1 4k 60k', 'map', 'alloc 0 64k', 'info', 'length');
  await sameRun(t, a, b, ['-s', ...session]);
  // qemu-io 7.2 ignores reopen -r in snapshot mode and fails reopen -w (its overlay is unlinked at
  // open): ours reopens the overlay as asked, keeping what was written to it.
  const reopened = await qcow2Cli('io', '-s', ...cmds('write -P 2 0 4k', 'reopen -r', 'read -P 2 0 4k', 'write 0 4k', 'reopen -w', 'write -P 4 4k 4k', 'read -P 2 0 4k'), b);
  const done = (verb: string, offset: number) => `${verb} 4096/4096 bytes at offset ${offset}\n4 KiB, 1 ops; TIME\n`;
  t.is(maskTimes(reopened.stdout), done('wrote', 0) + done('read', 0) + done('wrote', 4096) + done('read', 0));
  t.is(reopened.stderr, 'qcow2: Block node is read-only\n');
  await sameRun(t, a, b, ['-s', '-r', ...cmds('read -P 1 0 4k', 'write 0 4k')]);
  const [ra, rb] = await rawTwins(t);
  await sameRun(t, ra, rb, ['-s', '-f', 'raw', ...cmds('write -P 5 0 4k', 'read -P 5 0 4k', 'length')]);
  const ours = await qcow2Cli('io', ...cmds(`open -s ${b}`, 'write -P 3 0 4k', 'close', `open ${b}`, 'read -P 1 0 64k'));
  t.is(ours.code, 0, ours.stdout + ours.stderr);
  t.deepEqual(await readFile(b), before, 'the image file is untouched');
  await assertSameImages(t, a, b, 'qcow2');
  t.deepEqual((await readdir(tmpdir())).filter((name) => name.startsWith('qcow2-io-')), [], 'no overlay left behind');
});
