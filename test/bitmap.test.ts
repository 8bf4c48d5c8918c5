/**
 * Persistent dirty bitmaps kept up to date by our writes, against qemu's on twin images: images get
 * bitmaps from `qemu-img bitmap`, the same requests go through qemu-io and through us, and then the
 * bitmaps (flags, granularity, the dirty granules) and `qemu-img info` / `check` must agree.
 */
import { spawn } from 'node:child_process';
import { copyFile, open as openFile, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes, Qcow2Error, Qcow2Image, bitmap, open } from '../ts/index.js';
import { parseBitmapDirectory } from '../ts/qcow2/bitmaps.js';
import { parseHeader } from '../ts/qcow2/header.js';
import { CLI, patternBytes, qcow2Cli, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';
import { runIn, runTwin, twinDirs } from './helpers/twin.js';

/** One bitmap as the test reads it from the file, independently of the engine. */
interface BitmapState {
  name: string;
  flags: number;
  granularityBits: number;
  tableEntries: number;
  /** Indices of the set bits. */
  dirty: number[];
}

/** Decode every bitmap of `file`: directory through the library, tables and data read here. */
async function bitmapStates(file: string): Promise<BitmapState[]> {
  const bytes = await readFile(file);
  const header = parseHeader(bytes, bytes.length);
  if (!header.bitmaps) return [];
  const { bitmapDirectoryOffset: at, bitmapDirectorySize: size } = header.bitmaps;
  const entries = parseBitmapDirectory(bytes.subarray(at, at + size), header, bytes.length);
  const cs = header.clusterSize;
  return entries.map((e) => {
    const granules = Math.ceil(header.size / e.granularity);
    const dirty: number[] = [];
    for (let j = 0; j < e.bitmapTableSize; j++) {
      const entry = bytes.readBigUInt64BE(e.bitmapTableOffset + 8 * j);
      const host = Number(entry & 0x00fffffffffffe00n);
      for (let bit = 0; bit < cs * 8 && j * cs * 8 + bit < granules; bit++) {
        const set = host !== 0 ? (bytes[host + (bit >> 3)] >> (bit & 7)) & 1 : Number(entry & 1n);
        if (set) dirty.push(j * cs * 8 + bit);
      }
    }
    return { name: e.name, flags: e.flags, granularityBits: e.granularityBits, tableEntries: e.bitmapTableSize, dirty };
  });
}

/** The "bitmaps" part of `qemu-img info --output=json`, and whether the image is marked dirty. */
async function infoBitmaps(file: string): Promise<unknown> {
  const info = JSON.parse(await qemuImg('info', '--output=json', file)) as {
    'format-specific': { data: { bitmaps?: unknown } };
    'dirty-flag': boolean;
  };
  return { bitmaps: info['format-specific'].data.bitmaps, dirty: info['dirty-flag'] };
}

/** `qemu-img check` of `file`: exit code and report. */
async function checkOf(file: string): Promise<{ code: number; stdout: string }> {
  const r = await runProgram('qemu-img', ['check', file]);
  return { code: r.code, stdout: r.stdout.replace(/\d+\/\d+ = [\d.]+% allocated.*\n/, '').replace(/Image end offset: \d+\n/, '') };
}

/** Twin images 'theirs.qcow2' and 'ours.qcow2' with the bitmaps `add` makes (qemu-img bitmap --add options). */
async function twins(t: ExecutionContext, size: string, add: string[][], create: string[] = []): Promise<{ theirs: string; ours: string }> {
  const dir = await tempDir(t);
  const theirs = path.join(dir, 'theirs.qcow2');
  const ours = path.join(dir, 'ours.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', ...create, theirs, size);
  for (const options of add) await qemuImg('bitmap', '--add', ...options.slice(0, -1), theirs, options[options.length - 1]);
  await copyFile(theirs, ours);
  return { theirs, ours };
}

/** Both images have the same bitmaps (flags, granularity, dirty granules), info lists and clean checks. */
async function sameBitmaps(t: ExecutionContext, files: { theirs: string; ours: string }, label: string): Promise<void> {
  t.deepEqual(await bitmapStates(files.ours), await bitmapStates(files.theirs), `bitmaps after ${label}`);
  t.deepEqual(await infoBitmaps(files.ours), await infoBitmaps(files.theirs), `qemu-img info after ${label}`);
  const info = await qcow2Cli('info', files.ours);
  t.is(info.stdout, await qemuImg('info', files.ours), `qcow2 info after ${label}`);
  const check = await checkOf(files.ours);
  t.is(check.code, 0, `check after ${label}: ${check.stdout}`);
  t.deepEqual(check, await checkOf(files.theirs), `check report after ${label}`);
}

/** Run qemu-io commands on their image and `qcow2 io` with the same on ours. */
async function ioBoth(files: { theirs: string; ours: string }, commands: string[]): Promise<void> {
  const args = commands.flatMap((c) => ['-c', c]);
  await qemuIo('-f', 'qcow2', ...args, files.theirs);
  const ours = await qcow2Cli('io', '-f', 'qcow2', ...args, files.ours);
  if (ours.code !== 0 || /failed|error/i.test(ours.stdout + ours.stderr)) throw new Error(`qcow2 io: ${ours.stdout}${ours.stderr}`);
}

/** Three bitmaps: auto at the default granularity, disabled at 128 KiB, auto at 512 bytes. */
const THREE = [['b1'], ['-g', '128k', '--disable', 'b2'], ['-g', '512', 'b3']];

test('writes, zero writes, discards and compressed writes through qcow2 io mark the bitmaps as qemu-io does', async (t) => {
  const files = await twins(t, '10M', THREE);
  await ioBoth(files, [
    'write -P 1 0 4k',
    'write -P 2 1M 1',
    'discard 100k 4k',
    'write -z 300k 1',
    'write -z -u 2M 192k',
    'write -c -P 3 512k 64k',
    'write -P 4 3000000 100000',
    'discard 4M 1M',
    'write -P 5 10485759 1',
  ]);
  await sameBitmaps(t, files, 'the first session');
  // A second session adds to what the first recorded; qemu reads what we stored and the other way round.
  await ioBoth(files, ['write -P 6 6M 64k', 'aio_write -P 7 7M 4k', 'aio_flush']);
  await qemuIo('-f', 'qcow2', '-c', 'write 8M 1k', files.ours);
  await qemuIo('-f', 'qcow2', '-c', 'write 8M 1k', files.theirs);
  await sameBitmaps(t, files, 'three sessions');
  const states = await bitmapStates(files.ours);
  t.deepEqual(states.map((s) => s.flags), [2, 0, 2], 'auto flags kept, in_use cleared');
  t.deepEqual(states[1].dirty, [], 'the disabled bitmap records nothing');
  t.true(states[0].dirty.length > 0);
});

test('library writes mark the bitmaps; the autoclear bit stays set', async (t) => {
  const files = await twins(t, '64M', [['a'], ['-g', '1M', 'big']], ['-o', 'cluster_size=4096']);
  await qemuIo(
    '-f', 'qcow2',
    '-c', 'write 12345 70000',
    '-c', 'write -z 20M 1M',
    '-c', 'discard 30M 5000',
    '-c', 'write -c 40M 8k',
    files.theirs,
  );
  const image = (await open(files.ours)) as Qcow2Image;
  await image.write(patternBytes(70000, 1), 12345);
  await image.writeZeroes(20 << 20, 1 << 20);
  await image.discard(30 << 20, 5000);
  await image.writeCompressed(patternBytes(8192, 2), 40 << 20);
  await image.close();
  await sameBitmaps(t, files, 'library writes');
  const header = parseHeader(await readFile(files.ours), (await readFile(files.ours)).length);
  t.true(header.bitmapsAutoclear);
});

test('many concurrent writes are all recorded', async (t) => {
  const files = await twins(t, '32M', [['-g', '4096', 'fine']]);
  const offsets = Array.from({ length: 200 }, (_, i) => (i * 7919 * 4096) % (32 << 20));
  const image = await open(files.ours);
  await Promise.all(offsets.map((o, i) => image.write(patternBytes(512, i), o + 100)));
  await image.close();
  const [state] = await bitmapStates(files.ours);
  t.deepEqual(state.dirty, [...new Set(offsets.map((o) => o / 4096))].sort((a, b) => a - b));
  t.is((await checkOf(files.ours)).code, 0);
});

test('resizes: bitmaps follow the new size as qemu-img resize leaves them', async (t) => {
  const files = await twins(t, '10M', [['b1'], ['-g', '512', '--disable', 'b2']]);
  await ioBoth(files, ['write 0 4k', 'write 9M 64k']);
  // Grow far enough that the 512-byte bitmap's table needs a second cluster, then shrink back.
  for (const size of ['300M', '5M', '12M']) {
    await qemuImg('resize', '-q', '--shrink', '-f', 'qcow2', files.theirs, size);
    const r = await qcow2Cli('resize', '-q', '--shrink', '-f', 'qcow2', files.ours, size);
    t.is(r.code, 0, r.stderr);
    await sameBitmaps(t, files, `resize to ${size}`);
    await ioBoth(files, ['write 4M 1k', 'write 4608k 1']);
    await sameBitmaps(t, files, `writes after resize to ${size}`);
  }
});

test('a bitmap in use at open stays in use and untouched; resize refuses it as qemu-img does', async (t) => {
  const files = await twins(t, '10M', [['good'], ['bad']]);
  // qemu leaves a bitmap in use when killed: made here by setting the flag of 'bad' on both images.
  for (const file of [files.theirs, files.ours]) await setInUse(file, 'bad');
  await ioBoth(files, ['write 0 64k', 'write 5M 1']);
  await sameBitmaps(t, files, 'writes with a bitmap in use');
  const states = await bitmapStates(files.ours);
  t.deepEqual(states.map((s) => [s.name, s.flags]), [['good', 2], ['bad', 3]]);
  const theirs = await runProgram('qemu-img', ['resize', files.theirs, '20M']);
  const ours = await qcow2Cli('resize', files.ours, '20M');
  t.is(ours.code, theirs.code);
  t.is(ours.stderr.split('\n')[0].replace(/^qcow2:/, ''), theirs.stderr.split('\n')[0].replace(/^qemu-img:/, ''));
  await sameBitmaps(t, files, 'refused resize');
});

/** Set the in_use flag of bitmap `name` in `file`'s directory. */
async function setInUse(file: string, name: string): Promise<void> {
  const bytes = await readFile(file);
  const header = parseHeader(bytes, bytes.length);
  const { bitmapDirectoryOffset: at, bitmapDirectorySize: size } = header.bitmaps!;
  let entryAt = at;
  for (const e of parseBitmapDirectory(bytes.subarray(at, at + size), header, bytes.length)) {
    if (e.name === name) {
      const fd = await openFile(file, 'r+');
      const flags = Buffer.alloc(4);
      flags.writeUInt32BE(e.flags | 1);
      await fd.write(flags, 0, 4, entryAt + 12);
      await fd.close();
      return;
    }
    entryAt += Math.ceil((24 + e.extraData.length + Buffer.byteLength(e.name)) / 8) * 8;
  }
  throw new Error(`no bitmap ${name}`);
}

/** Start a writer; resolves with the process once `ready` (polled) says it is mid-session. */
function startWriter(program: string, args: string[], ready: (out: string) => Promise<boolean>): Promise<ReturnType<typeof spawn>> {
  return new Promise((resolve, reject) => {
    const child = spawn(program, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout!.on('data', (chunk: Buffer) => (out += chunk.toString()));
    child.on('error', reject);
    child.on('exit', (code) => reject(new Error(`${program} exited ${code} before it was killed: ${out}`)));
    const poll = async (): Promise<void> => {
      if (await ready(out)) resolve(child);
      else setTimeout(() => void poll().catch(reject), 20);
    };
    void poll().catch(reject);
  });
}

/** The bitmaps of `file` are marked in use (a writer has it open), and stay readable while it runs. */
async function inUse(file: string): Promise<boolean> {
  const states = await bitmapStates(file).catch(() => []);
  return states.length > 0 && states.every((s) => (s.flags & 1) !== 0);
}

test('a writer killed with SIGKILL leaves every consistent bitmap in use, as qemu does', async (t) => {
  const files = await twins(t, '10M', [['auto'], ['-g', '128k', '--disable', 'off']]);
  const commands = ['-c', 'write 0 4k', '-c', 'sleep 60000'];
  const writers = await Promise.all([
    // qemu-io's output to a pipe is block-buffered: its bitmaps being marked in use says it is running.
    startWriter('qemu-io', ['-f', 'qcow2', ...commands, files.theirs], () => inUse(files.theirs)),
    startWriter(process.execPath, [CLI, 'io', '-f', 'qcow2', ...commands, files.ours], async (out) => out.includes('wrote')),
  ]);
  await Promise.all(
    writers.map((w) => new Promise((resolve) => {
      w.removeAllListeners('exit');
      w.on('exit', resolve);
      w.kill('SIGKILL');
    })),
  );
  const [ours, theirs] = [await bitmapStates(files.ours), await bitmapStates(files.theirs)];
  t.deepEqual(ours.map((s) => [s.name, s.flags]), [['auto', 3], ['off', 1]]);
  t.deepEqual(ours.map((s) => s.flags), theirs.map((s) => s.flags));
  t.deepEqual(await infoBitmaps(files.ours), await infoBitmaps(files.theirs));
  t.is((await checkOf(files.ours)).code, 0, 'the killed image checks clean');
});

test('bitmaps a bitmap-unaware writer invalidated stay invalid', async (t) => {
  const files = await twins(t, '10M', [['b']]);
  // Clear the bitmaps autoclear bit (header byte 95, bit 0) on both, as a writer without bitmap support does.
  for (const file of [files.theirs, files.ours]) {
    const fd = await openFile(file, 'r+');
    await fd.write(Buffer.from([0]), 0, 1, 95);
    await fd.close();
  }
  await ioBoth(files, ['write 0 4k']);
  // qemu drops the extension (leaking its clusters); ours keeps it, still marked invalid: info agrees.
  t.deepEqual(await infoBitmaps(files.ours), await infoBitmaps(files.theirs));
  t.false(parseHeader(await readFile(files.ours), 1 << 20).bitmapsAutoclear);
});

test('read-only opens leave the bitmaps alone', async (t) => {
  const files = await twins(t, '10M', [['b']]);
  const before = await readFile(files.ours);
  const image = await open(files.ours, { readOnly: true });
  const buffer = Buffer.alloc(4096);
  await image.read(buffer, 0);
  await image.close();
  t.true((await readFile(files.ours)).equals(before));
});

/** Make the same images in both folders: `img.qcow2` (and `src.qcow2`) with the steps given. */
async function twinFolders(t: ExecutionContext, setup: string[][]): Promise<{ theirs: string; ours: string }> {
  const dirs = await twinDirs(await tempDir(t));
  for (const dir of [dirs.theirs, dirs.ours]) {
    for (const [program, ...args] of setup) {
      const r = await runIn(dir, program, args);
      if (r.code !== 0) throw new Error(`${program} ${args.join(' ')}: ${r.stderr}`);
    }
  }
  return dirs;
}

/** Run `bitmap ARGS` with qemu-img and with us; same output and exit code, then the same bitmaps in `img.qcow2`. */
async function sameCommand(t: ExecutionContext, dirs: { theirs: string; ours: string }, args: string[]): Promise<void> {
  const { theirs, ours } = await runTwin(dirs, ['bitmap', ...args]);
  const label = args.join(' ');
  t.is(ours.code, theirs.code, `exit code of ${label}: ${ours.stderr}`);
  t.is(ours.stdout, theirs.stdout, `stdout of ${label}`);
  t.is(ours.stderr, theirs.stderr, `stderr of ${label}`);
  await sameBitmaps(t, { theirs: path.join(dirs.theirs, 'img.qcow2'), ours: path.join(dirs.ours, 'img.qcow2') }, label);
}

test('qcow2 bitmap: add, remove, clear, enable, disable and merge like qemu-img bitmap', async (t) => {
  const dirs = await twinFolders(t, [
    ['qemu-img', 'create', '-q', '-f', 'qcow2', 'img.qcow2', '10M'],
    ['qemu-img', 'create', '-q', '-f', 'qcow2', 'src.qcow2', '10M'],
    ['qemu-img', 'bitmap', '--add', '-g', '128k', 'src.qcow2', 'src'],
    ['qemu-io', '-c', 'write 0 4k', '-c', 'write 5M 300k', 'src.qcow2'],
  ]);
  const steps = [
    ['--add', 'img.qcow2', 'a'],
    ['--add', '-g', '512', 'img.qcow2', 'fine'],
    ['--add', '--disable', '-g', '1M', 'img.qcow2', 'off'],
    ['--add', 'img.qcow2', 'a'],
    ['--merge', 'src', '-b', 'src.qcow2', '-F', 'qcow2', 'img.qcow2', 'a'],
    ['--merge', 'a', 'img.qcow2', 'fine'],
    ['--merge', 'a', 'img.qcow2', 'off'],
    ['--clear', 'img.qcow2', 'a'],
    ['--disable', 'img.qcow2', 'fine'],
    ['--enable', 'img.qcow2', 'off'],
    ['--add', '--remove', 'img.qcow2', 'brief'],
    ['--add', '--merge', 'off', '--disable', 'img.qcow2', 'copy'],
    ['--remove', 'img.qcow2', 'fine'],
    ['--merge', 'nope', 'img.qcow2', 'a'],
    ['--merge', 'a', 'img.qcow2', 'nope'],
    ['--merge', 'src', '-b', 'src.qcow2', '-F', 'raw', 'img.qcow2', 'a'],
    ['--clear', 'img.qcow2', 'nope'],
    ['--add', '-g', '1000', 'img.qcow2', 'g'],
    ['--add', '-g', '4G', 'img.qcow2', 'g'],
    ['--add', '-g', '2G', 'img.qcow2', 'huge'],
  ];
  for (const step of steps) await sameCommand(t, dirs, step);
  // Writes after the commands are recorded in the enabled bitmaps only.
  await ioBoth({ theirs: path.join(dirs.theirs, 'img.qcow2'), ours: path.join(dirs.ours, 'img.qcow2') }, ['write 7M 64k']);
  await sameBitmaps(t, { theirs: path.join(dirs.theirs, 'img.qcow2'), ours: path.join(dirs.ours, 'img.qcow2') }, 'writes after');
  for (const name of ['a', 'off', 'copy', 'huge']) await sameCommand(t, dirs, ['--remove', 'img.qcow2', name]);
  // No bitmap left: the extension is gone and the autoclear bit clear, as qemu leaves them.
  const ours = await readFile(path.join(dirs.ours, 'img.qcow2'));
  const theirs = await readFile(path.join(dirs.theirs, 'img.qcow2'));
  t.true(ours.subarray(0, 512).equals(theirs.subarray(0, 512)), 'header area');
  await sameCommand(t, dirs, ['--add', 'img.qcow2', 'again']);
});

test('qcow2 bitmap: in-use bitmaps, usage errors, other formats', async (t) => {
  const dirs = await twinFolders(t, [
    ['qemu-img', 'create', '-q', '-f', 'qcow2', 'img.qcow2', '10M'],
    ['qemu-img', 'bitmap', '--add', 'img.qcow2', 'used'],
    ['qemu-img', 'bitmap', '--add', 'img.qcow2', 'good'],
    ['qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '1M'],
    ['qemu-img', 'create', '-q', '-f', 'raw', 'disk.raw', '1M'],
  ]);
  for (const dir of [dirs.theirs, dirs.ours]) await setInUse(path.join(dir, 'img.qcow2'), 'used');
  const steps = [
    ['--clear', 'img.qcow2', 'used'],
    ['--enable', 'img.qcow2', 'used'],
    ['--disable', 'img.qcow2', 'used'],
    ['--merge', 'good', 'img.qcow2', 'used'],
    ['--merge', 'used', 'img.qcow2', 'good'],
    ['--remove', 'img.qcow2', 'used'],
    [],
    ['img.qcow2', 'good'],
    ['--add', 'img.qcow2'],
    ['--add', 'img.qcow2', 'a', 'b'],
    ['-g', '64k', '--remove', 'img.qcow2', 'good'],
    ['-b', 'img.qcow2', '--add', 'img.qcow2', 'x'],
    ['-F', 'qcow2', '--add', 'img.qcow2', 'x'],
    ['--add', '-g', 'abc', 'img.qcow2', 'x'],
    ['--frob', 'img.qcow2', 'x'],
    ['--add', 'missing.qcow2', 'x'],
    ['--clear', '-f', 'raw', 'disk.raw', 'x'],
    ['--clear', 'disk.raw', 'x'],
  ];
  for (const step of steps) await sameCommand(t, dirs, step);
  const { theirs, ours } = await runTwin(dirs, ['bitmap', '--add', 'v2.qcow2', 'x']);
  t.is(ours.code, theirs.code);
  t.regex(ours.stderr, /^PROG: Operation add on bitmap x failed: Can't make bitmap 'x' persistent in '.*': Cannot store dirty bitmaps in qcow2 v2 files\n$/);
});

test('library bitmap(): actions in order, errors with codes, earlier actions kept', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'img.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', file, '4M');
  await bitmap(file, 'b', [{ kind: 'add' }, { kind: 'disable' }], { granularity: 65536 });
  const error = await t.throwsAsync<Qcow2Error>(bitmap(file, 'c', [{ kind: 'add' }, { kind: 'clear' }, { kind: 'merge', source: 'none' }]));
  t.is(error?.code, 'ENOENT');
  t.is(error?.message, "Operation merge on bitmap c failed: Dirty bitmap 'none' not found");
  t.deepEqual((await bitmapStates(file)).map((s) => [s.name, s.flags]), [['b', 0], ['c', 2]]);
  await t.throwsAsync(bitmap(file, 'b', []), { code: ErrorCodes.INVALID_ARGUMENT });
  await t.throwsAsync(bitmap(file, 'b', [{ kind: 'remove' }], { granularity: 4096 }), { message: 'granularity only supported with --add' });
  t.is((await checkOf(file)).code, 0);
});

test('a bitmap table entry that breaks the rules fails a writable open with a clear error and changes nothing', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'img.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', file, '10M');
  await qemuImg('bitmap', '--add', file, 'b');
  await qemuIo('-f', 'qcow2', '-c', 'write 0 64k', file);
  const bytes = await readFile(file);
  const header = parseHeader(bytes, bytes.length);
  const { bitmapDirectoryOffset: at, bitmapDirectorySize: size } = header.bitmaps!;
  const [entry] = parseBitmapDirectory(bytes.subarray(at, at + size), header, bytes.length);
  const good = bytes.readBigUInt64BE(entry.bitmapTableOffset);
  // qemu refuses all but the offset past the end at open; that one fails when its close frees the cluster.
  const refused = /Could not read bitmap_table/;
  const broken: [string, bigint, RegExp, RegExp][] = [
    ['a reserved bit', good | (1n << 63n), /reserved bits 0x8000000000000000 set/, refused],
    ['an unaligned offset', good + 512n, /is not aligned to the cluster size 65536/, refused],
    ['an offset past the end of the file', BigInt((Math.ceil(bytes.length / 65536) + 4) * 65536), /lies past the end of the file/, /qcow2_free_clusters failed/],
    ['an offset with the all-ones bit', good | 1n, /has an offset and the all-ones bit/, refused],
  ];
  for (const [what, value, message, qemuMessage] of broken) {
    const copy = Buffer.from(bytes);
    copy.writeBigUInt64BE(value, entry.bitmapTableOffset);
    const [target, twin] = [path.join(dir, 'broken.qcow2'), path.join(dir, 'twin.qcow2')];
    await writeFile(target, copy);
    await writeFile(twin, copy);
    const theirs = await runProgram('qemu-io', ['-f', 'qcow2', '-c', 'write 0 4k', twin]);
    t.regex(theirs.stderr, qemuMessage, `qemu on ${what}`);
    const error = await t.throwsAsync<Qcow2Error>(open(target), undefined, what);
    t.is(error?.code, ErrorCodes.CORRUPT, what);
    t.regex(error?.message ?? '', message, what);
    t.true((await readFile(target)).equals(copy), `${what}: the image is unchanged`);
  }
});

test('overlap protection covers bitmap tables and data: a write mapped onto them is refused and marks the image corrupt', async (t) => {
  for (const [structure, pick] of [
    ['bitmap data', (table: number, data: number) => data],
    ['bitmap table', (table: number) => table],
  ] as const) {
    const file = path.join(await tempDir(t), 'img.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', file, '4M');
    await qemuImg('bitmap', '--add', file, 'b');
    await qemuIo('-f', 'qcow2', '-c', 'write -P 1 0 64k', file);
    const bytes = await readFile(file);
    const header = parseHeader(bytes, bytes.length);
    const { bitmapDirectoryOffset: at, bitmapDirectorySize: size } = header.bitmaps!;
    const [entry] = parseBitmapDirectory(bytes.subarray(at, at + size), header, bytes.length);
    const data = Number(bytes.readBigUInt64BE(entry.bitmapTableOffset) & 0x00fffffffffffe00n);
    t.true(data > 0, 'the bitmap has a data cluster');
    const target = pick(entry.bitmapTableOffset, data);
    // Guest cluster 0's L2 entry now maps it, owned, onto the structure.
    const l2 = Number(bytes.readBigUInt64BE(header.l1TableOffset) & 0x00fffffffffffe00n);
    const mapped = Buffer.alloc(8);
    mapped.writeBigUInt64BE(BigInt(target) | (1n << 63n));
    const fd = await openFile(file, 'r+');
    await fd.write(mapped, 0, 8, l2);
    await fd.close();
    const before = (await readFile(file)).subarray(target, target + 65536);
    const image = await open(file);
    const error = await t.throwsAsync<Qcow2Error>(image.write(Buffer.alloc(4096, 2), 0));
    t.is(error?.code, ErrorCodes.CORRUPT, structure);
    t.true(error?.message.includes(`overlaps with ${structure}`), error?.message);
    // The bitmaps cannot be stored by an image marked corrupt: the close says so, and they stay in use.
    await t.throwsAsync(image.close(), { code: ErrorCodes.CORRUPT });
    t.true((await readFile(file)).subarray(target, target + 65536).equals(before), `${structure} unchanged`);
    t.deepEqual((await bitmapStates(file)).map((s) => s.flags), [3]);
  }
});
