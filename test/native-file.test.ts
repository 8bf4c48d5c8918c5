/** The native file layer: O_DIRECT with its fallback, unaligned requests, parallel I/O, errors. */
import { readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

import test, { ExecutionContext } from 'ava';

import { native } from '../ts/native.js';
import { patternBytes, tempDir } from './helpers/qemu.js';

const run = promisify(execFile);

test('files on a disk file system open with O_DIRECT and report their alignment', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.img');
  await writeFile(file, patternBytes(65536, 1));
  const f = await native.NativeFile.open(file, { cache: 'none' });
  t.true(f.info.direct);
  t.false(f.info.directFallback);
  t.true([512, 1024, 2048, 4096].includes(f.info.reqAlign));
  t.true(f.info.memAlign >= 1 && f.info.memAlign <= 4096);
  await f.close();
});

/** Mount a ramfs (a file system that refuses O_DIRECT) for the test; the machines here run as root. */
async function ramfs(t: ExecutionContext): Promise<string> {
  const dir = await tempDir(t);
  await run('mount', ['-t', 'ramfs', 'ramfs', dir]);
  t.teardown(() => run('umount', [dir]).then(() => undefined));
  return dir;
}

test('where the file system refuses O_DIRECT, I/O falls back to buffered and says so', async (t) => {
  const dir = await ramfs(t);
  const file = path.join(dir, 'a.img');
  await writeFile(file, patternBytes(8192, 2));
  const f = await native.NativeFile.open(file, { cache: 'none', writable: true });
  t.false(f.info.direct);
  t.true(f.info.directFallback);
  t.is(f.info.reqAlign, 1);
  const buf = Buffer.alloc(100);
  await f.read(buf, 3);
  t.deepEqual(buf, patternBytes(8192, 2).subarray(3, 103));
  await f.write(Buffer.from('xyz'), 8190);
  await f.close();
  const bytes = await readFile(file);
  t.is(bytes.length, 8193);
  t.is(bytes.subarray(8190).toString(), 'xyz');
});

test('cache=writeback does not ask for O_DIRECT', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.img');
  await writeFile(file, Buffer.alloc(4096));
  const f = await native.NativeFile.open(file, { cache: 'writeback' });
  t.false(f.info.direct);
  t.false(f.info.directFallback);
  t.is(f.info.cache, 'writeback');
  await f.close();
});

test('unaligned reads at every edge return the file bytes, zeros past the end', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.img');
  const content = patternBytes(3 * 4096 + 100, 3);
  await writeFile(file, content);
  const f = await native.NativeFile.open(file, { cache: 'none' });
  t.true(f.info.direct);
  for (const [off, len] of [
    [0, 1], [1, 511], [511, 2], [4095, 4098], [100, 9000], [12288, 100], [12300, 200], [0, content.length],
  ]) {
    const buf = Buffer.alloc(len, 0xaa);
    await f.read(buf, off);
    const expected = Buffer.alloc(len);
    content.copy(expected, 0, off, Math.min(off + len, content.length));
    t.deepEqual(buf, expected, `read ${off}+${len}`);
  }
  await f.close();
});

test('unaligned writes do read-modify-write and keep the neighbouring bytes', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.img');
  const model = patternBytes(5 * 4096, 4);
  await writeFile(file, model);
  const f = await native.NativeFile.open(file, { cache: 'none', writable: true });
  for (const [off, len, seed] of [[1, 10, 5], [4090, 20, 6], [8192, 4096, 7], [100, 12000, 8], [20460, 20, 9]]) {
    const data = patternBytes(len, seed);
    await f.write(data, off);
    data.copy(model, off);
    if (off + len > model.length) t.fail('test writes past its model');
  }
  await f.flush();
  await f.close();
  t.deepEqual(await readFile(file), model);
});

test('a write past the end grows the file', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.img');
  await writeFile(file, Buffer.alloc(0));
  const f = await native.NativeFile.open(file, { cache: 'none', writable: true });
  await f.write(Buffer.from('hello'), 10000);
  t.is(await f.size(), 10005);
  await f.close();
  const bytes = await readFile(file);
  t.is(bytes.subarray(10000).toString(), 'hello');
  t.true(bytes.subarray(0, 10000).every((b) => b === 0));
});

test('many overlapping unaligned writes in parallel leave each byte from one of its writers', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.img');
  const size = 64 * 1024;
  await writeFile(file, Buffer.alloc(size));
  const f = await native.NativeFile.open(file, { cache: 'none', writable: true });
  // Each writer fills a distinct byte value into its own non-overlapping range whose edges share
  // blocks with its neighbours: a lost read-modify-write would zero a neighbour's bytes.
  const writes = [];
  for (let i = 0; i < 64; i++) {
    const off = i * 1000 + 7;
    writes.push(f.write(Buffer.alloc(1000, i + 1), off));
  }
  await Promise.all(writes);
  await f.close();
  const bytes = await readFile(file);
  for (let i = 0; i < 64; i++) {
    const slice = bytes.subarray(i * 1000 + 7, i * 1000 + 1007);
    t.true(slice.every((b) => b === i + 1), `range ${i}`);
  }
});

test('parallel aligned and unaligned reads through vectors', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.img');
  const content = patternBytes(1 << 20, 10);
  await writeFile(file, content);
  const f = await native.NativeFile.open(file, { cache: 'none' });
  const a = native.allocAligned(4096);
  const b = native.allocAligned(8192);
  const c = Buffer.alloc(300);
  await Promise.all([f.readv([a, b], 65536), f.readv([c, Buffer.alloc(5)], 1)]);
  t.deepEqual(a, content.subarray(65536, 65536 + 4096));
  t.deepEqual(b, content.subarray(65536 + 4096, 65536 + 4096 + 8192));
  t.deepEqual(c, content.subarray(1, 301));
  await f.close();
});

test('allocAligned gives zeroed buffers aligned for O_DIRECT', (t) => {
  const buf = native.allocAligned(12345);
  t.is(buf.length, 12345);
  t.true(buf.every((b) => b === 0));
  t.is(native.bufferAlign, 4096);
  t.throws(() => native.allocAligned(-1), { instanceOf: RangeError });
});

test('punch hole, zero range, truncate, seekData/seekHole', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.img');
  await writeFile(file, patternBytes(1 << 20, 11));
  const f = await native.NativeFile.open(file, { cache: 'none', writable: true });
  await f.allocate('punch', 256 * 1024, 512 * 1024);
  t.is(await f.seekHole(0), 256 * 1024);
  t.is(await f.seekData(256 * 1024), 768 * 1024);
  await f.allocate('zero', 0, 4096);
  const buf = Buffer.alloc(4096, 1);
  await f.read(buf, 0);
  t.true(buf.every((b) => b === 0));
  await f.truncate(2 << 20);
  t.is(await f.size(), 2 << 20);
  t.is(await f.seekData(1 << 20), 2 << 20, 'no data after the old end');
  t.true((await f.allocatedBytes()) < 1 << 20);
  await f.flush();
  await f.close();
  t.is((await stat(file)).size, 2 << 20);
});

test('errors carry the errno name as code and name the file', async (t) => {
  const dir = await tempDir(t);
  const missing = path.join(dir, 'missing.img');
  const error = await t.throwsAsync(native.NativeFile.open(missing));
  t.is((error as NodeJS.ErrnoException).code, 'ENOENT');
  t.regex(error!.message, /missing\.img/);
  const dirError = await t.throwsAsync(native.NativeFile.open(dir));
  t.is((dirError as NodeJS.ErrnoException).code, 'EISDIR');
  const file = path.join(dir, 'ro.img');
  await writeFile(file, Buffer.alloc(4096));
  const f = await native.NativeFile.open(file);
  const writeError = await t.throwsAsync(f.write(Buffer.alloc(10), 0));
  t.is((writeError as NodeJS.ErrnoException).code, 'EBADF');
  await f.close();
  const closedError = await t.throwsAsync(async () => f.read(Buffer.alloc(1), 0));
  t.is((closedError as NodeJS.ErrnoException).code, 'EBADF');
});

test('bad arguments are refused before any I/O', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.img');
  await writeFile(file, Buffer.alloc(4096));
  const f = await native.NativeFile.open(file);
  t.throws(() => f.read(Buffer.alloc(1), -1), { instanceOf: RangeError });
  t.throws(() => f.read(Buffer.alloc(1), 1.5), { instanceOf: RangeError });
  t.throws(() => f.read('x' as unknown as Buffer, 0), { instanceOf: TypeError });
  t.throws(() => native.NativeFile.open(file, { cache: 'bogus' as 'none' }), { instanceOf: TypeError });
  await f.close();
});
