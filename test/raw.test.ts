/** Raw images through the public API: reads, writes, zeroes, discard, extents, streams, probing. */
import { open as fsOpen, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test from 'ava';

import { ErrorCodes, RawImage, open, probeFormat } from '../ts/index.js';
import { patternBytes, qcow2Cli, qemuImg, tempDir } from './helpers/qemu.js';

async function rawFile(t: Parameters<typeof tempDir>[0], content: Buffer): Promise<string> {
  const file = path.join(await tempDir(t), 'disk.raw');
  await writeFile(file, content);
  return file;
}

test('open() probes raw and qcow2 by magic', async (t) => {
  const dir = await tempDir(t);
  const raw = path.join(dir, 'a.raw');
  const qcow = path.join(dir, 'a.qcow2');
  await writeFile(raw, Buffer.from('QFI'));
  await qemuImg('create', '-f', 'qcow2', qcow, '1M');
  t.is(await probeFormat(raw), 'raw');
  t.is(await probeFormat(qcow), 'qcow2');
  const image = await open(raw, { readOnly: true });
  t.is(image.format, 'raw');
  t.is(image.size, 512, 'a raw disk is whole sectors, as QEMU sees it');
  const sector = Buffer.alloc(512, 1);
  await image.read(sector, 0);
  t.deepEqual(sector, Buffer.concat([Buffer.from('QFI'), Buffer.alloc(509)]));
  await image.close();
});

test('reads at unaligned offsets in parallel equal the file', async (t) => {
  const content = patternBytes(256 * 1024 + 17, 21);
  const file = await rawFile(t, content);
  const image = await open(file, { readOnly: true });
  const ranges = Array.from({ length: 64 }, (_, i) => [(i * 4099) % 200000, 1 + ((i * 7919) % 50000)]);
  const buffers = await Promise.all(
    ranges.map(async ([off, len]) => {
      const buf = Buffer.alloc(len);
      await image.read(buf, off);
      return buf;
    }),
  );
  ranges.forEach(([off, len], i) => t.deepEqual(buffers[i], content.subarray(off, off + len)));
  await image.close();
});

test('writes, zero writes and discards land where they should and qemu-img reads the same', async (t) => {
  const size = 1 << 20;
  const model = patternBytes(size, 22);
  const file = await rawFile(t, model);
  const image = await open(file);
  const data = patternBytes(5000, 23);
  await image.write(data, 4093);
  data.copy(model, 4093);
  await image.writeZeroes(65536 + 100, 70000);
  model.fill(0, 65536 + 100, 65536 + 100 + 70000);
  await image.writeZeroes(300000, 8192, { unmap: true });
  model.fill(0, 300000, 300000 + 8192);
  await image.discard(512 * 1024, 128 * 1024);
  model.fill(0, 512 * 1024, 640 * 1024);
  await image.flush();
  await image.close();
  t.deepEqual(await readFile(file), model);
  const out = path.join(path.dirname(file), 'copy.raw');
  await qemuImg('convert', '-f', 'raw', '-O', 'raw', file, out);
  t.deepEqual(await readFile(out), model);
});

test('requests outside the disk and writes to read-only images are refused with a code', async (t) => {
  const file = await rawFile(t, Buffer.alloc(8192));
  const image = await open(file, { readOnly: true });
  await t.throwsAsync(image.read(Buffer.alloc(2), 8191), { code: ErrorCodes.OUT_OF_BOUNDS });
  await t.throwsAsync(image.read(Buffer.alloc(1), -1), { code: ErrorCodes.INVALID_ARGUMENT });
  await t.throwsAsync(image.write(Buffer.alloc(1), 0), { code: ErrorCodes.READ_ONLY });
  await t.throwsAsync(image.discard(0, 512), { code: ErrorCodes.READ_ONLY });
  await image.close();
  await t.throwsAsync(image.read(Buffer.alloc(1), 0), { code: ErrorCodes.CLOSED });
  const writable = await open(file);
  await t.throwsAsync(writable.write(Buffer.alloc(2), 8191), { code: ErrorCodes.OUT_OF_BOUNDS });
  await writable.close();
});

test('a missing file and bad options give typed errors', async (t) => {
  const dir = await tempDir(t);
  await t.throwsAsync(open(path.join(dir, 'nope.raw')), { code: 'ENOENT' });
  await t.throwsAsync(open(dir, { format: 'raw' }), { code: 'EISDIR' });
  await t.throwsAsync(open(''), { code: ErrorCodes.INVALID_ARGUMENT });
  await t.throwsAsync(open(path.join(dir, 'x'), { cache: 'fast' as 'none' }), { code: ErrorCodes.INVALID_ARGUMENT });
  await t.throwsAsync(open(path.join(dir, 'x'), { format: 'vmdk' as 'raw' }), { code: ErrorCodes.INVALID_ARGUMENT });
});

test('extents show holes as zero and data as data, covering the whole range', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'sparse.raw');
  await writeFile(file, Buffer.alloc(0));
  await truncate(file, 4 << 20);
  const image = await open(file);
  await image.write(patternBytes(65536, 24), 1 << 20);
  await image.write(patternBytes(65536, 25), 3 << 20);
  await image.flush();
  const extents = [];
  for await (const e of image.extents()) extents.push(e);
  t.is(extents[0].offset, 0);
  for (let i = 1; i < extents.length; i++) t.is(extents[i].offset, extents[i - 1].offset + extents[i - 1].length);
  const last = extents[extents.length - 1];
  t.is(last.offset + last.length, 4 << 20);
  const dataBytes = extents.filter((e) => e.kind === 'data').reduce((n, e) => n + e.length, 0);
  t.true(dataBytes >= 2 * 65536 && dataBytes < 1 << 20, `data bytes ${dataBytes}`);
  t.true(extents.every((e) => e.kind === 'data' || e.kind === 'zero'));
  const window = [];
  for await (const e of image.extents({ offset: (1 << 20) - 100, length: 200 })) window.push(e);
  t.deepEqual(window.map((e) => [e.offset, e.length, e.kind]), [
    [(1 << 20) - 100, 100, 'zero'],
    [1 << 20, 100, 'data'],
  ]);
  await image.close();
});

test('createReadStream yields the disk bytes for any start and end', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'sparse.raw');
  await writeFile(file, Buffer.alloc(0));
  await truncate(file, 3 << 20);
  const content = Buffer.alloc(3 << 20);
  const image = await open(file);
  const data = patternBytes(100000, 26);
  await image.write(data, 2 << 20);
  data.copy(content, 2 << 20);
  const collect = async (opts: { start?: number; end?: number; chunkSize?: number }) => {
    const parts: Buffer[] = [];
    for await (const chunk of image.createReadStream(opts)) parts.push(chunk as Buffer);
    return Buffer.concat(parts);
  };
  t.deepEqual(await collect({}), content);
  t.deepEqual(await collect({ start: 5, end: (2 << 20) + 10, chunkSize: 65536 }), content.subarray(5, (2 << 20) + 11));
  t.throws(() => image.createReadStream({ start: 0, end: 3 << 20 }), { code: ErrorCodes.OUT_OF_BOUNDS });
  await image.close();
});

test('resize grows with a hole and shrinks', async (t) => {
  const file = await rawFile(t, patternBytes(8192, 27));
  const image = await RawImage.open(file);
  await image.resize(1 << 20);
  t.is(image.size, 1 << 20);
  const tail = Buffer.alloc(100, 1);
  await image.read(tail, (1 << 20) - 100);
  t.true(tail.every((b) => b === 0));
  await image.resize(4096);
  await image.close();
  t.is((await stat(file)).size, 4096);
});

test('Symbol.asyncDispose closes the image', async (t) => {
  const file = await rawFile(t, Buffer.alloc(4096));
  const image = await open(file, { readOnly: true });
  await image[Symbol.asyncDispose]();
  await t.throwsAsync(image.read(Buffer.alloc(1), 0), { code: ErrorCodes.CLOSED });
});

test('a raw file that is not whole sectors maps and converts like qemu-img (rounded up to 512)', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'odd.raw');
  await writeFile(file, patternBytes(1000, 28));
  const ours = await qcow2Cli('map', '--output=json', '-f', 'raw', file);
  t.is(ours.stdout, await qemuImg('map', '--output=json', '-f', 'raw', file));
  await qemuImg('convert', '-f', 'raw', '-O', 'raw', file, path.join(dir, 'theirs.raw'));
  const converted = await qcow2Cli('convert', '-f', 'raw', '-O', 'raw', file, path.join(dir, 'ours.raw'));
  t.is(converted.code, 0, converted.stderr);
  const theirs = await readFile(path.join(dir, 'theirs.raw'));
  t.is(theirs.length, 1024);
  t.deepEqual(await readFile(path.join(dir, 'ours.raw')), theirs);
});

test('extents of a file with more data runs than one native call lists (20,000) come out whole and in order', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'many.raw');
  const runs = 20000;
  const handle = await fsOpen(file, 'w');
  try {
    const block = Buffer.alloc(4096, 1);
    for (let i = 0; i < runs; i++) await handle.write(block, 0, 4096, i * 65536);
    await handle.truncate(runs * 65536 + 1000);
  } finally {
    await handle.close();
  }
  const image = await open(file, { format: 'raw' });
  const data: number[] = [];
  let pos = 0;
  for await (const e of image.extents()) {
    t.is(e.offset, pos);
    pos += e.length;
    if (e.kind === 'data') data.push(e.offset);
  }
  await image.close();
  t.is(pos, runs * 65536 + 1024, 'the last partial sector counted as zero');
  t.is(data.length, runs);
  t.true(data.every((offset, i) => offset === i * 65536));
});
