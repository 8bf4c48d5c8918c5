/** Broken and hostile qcow2 images: each gives a rejected promise with the right code, never a crash or a hang. */
import { readFile, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes, Image, Qcow2Error, Qcow2Image, allocAligned, open } from '../ts/index.js';
import { patternBytes, qcow2Cli, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';

const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;

/** A qcow2 file in memory with the offsets of its mapping tables. */
class Layout {
  constructor(
    readonly file: string,
    readonly bytes: Buffer,
  ) {}

  static async load(file: string): Promise<Layout> {
    return new Layout(file, await readFile(file));
  }

  get clusterBits(): number {
    return this.bytes.readUInt32BE(20);
  }
  get l1Offset(): number {
    return Number(this.bytes.readBigUInt64BE(40));
  }
  l1Entry(i: number): bigint {
    return this.bytes.readBigUInt64BE(this.l1Offset + 8 * i);
  }
  setL1Entry(i: number, value: bigint): void {
    this.bytes.writeBigUInt64BE(value, this.l1Offset + 8 * i);
  }
  /** Byte offset of the L2 entry of guest cluster `cluster` (the table must be allocated). */
  l2EntryAt(cluster: number, entryBytes = 8): number {
    const perTable = 2 ** this.clusterBits / entryBytes;
    const table = Number(this.l1Entry(Math.floor(cluster / perTable)) & 0x00fffffffffffe00n);
    return table + (cluster % perTable) * entryBytes;
  }
  l2Entry(cluster: number, entryBytes = 8): bigint {
    return this.bytes.readBigUInt64BE(this.l2EntryAt(cluster, entryBytes));
  }
  setL2Entry(cluster: number, value: bigint, entryBytes = 8): void {
    this.bytes.writeBigUInt64BE(value, this.l2EntryAt(cluster, entryBytes));
  }
  async save(): Promise<void> {
    await writeFile(this.file, this.bytes);
  }
}

/** An image of 4 KiB clusters (an L1 entry maps 2 MiB) with data in clusters 0-1 and at 4 MiB. */
async function smallImage(t: ExecutionContext, options = 'cluster_size=4096'): Promise<string> {
  const file = path.join(await tempDir(t), 'h.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-o', options, file, '8M');
  await qemuIo(file, '-c', 'write -P 1 0 8192', '-c', 'write -P 2 4M 4096');
  return file;
}

async function readRange(image: Image, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await image.read(buf, offset);
  return buf;
}

async function allExtents(image: Image): Promise<number> {
  let n = 0;
  for await (const _ of image.extents()) n++;
  return n;
}

/** Reads touching guest cluster 0 fail with `code`; the data at 4 MiB still reads. */
async function onlyFirstRangeFails(t: ExecutionContext, file: string, code: string, message?: RegExp): Promise<void> {
  const image = await open(file, { readOnly: true });
  try {
    await t.throwsAsync(readRange(image, 0, 4096), { code, message });
    await t.throwsAsync(readRange(image, 100, 1 << 20), { code });
    await t.throwsAsync(allExtents(image), { code });
    t.true((await readRange(image, 4 << 20, 4096)).equals(Buffer.alloc(4096, 2)));
  } finally {
    await image.close();
  }
}

test('an L1 entry pointing past the end of the file', async (t) => {
  const l = await Layout.load(await smallImage(t));
  l.setL1Entry(0, COPIED | (1n << 40n));
  await l.save();
  await onlyFirstRangeFails(t, l.file, ErrorCodes.CORRUPT, /L1 entry 0 .*past the end/);
});

test('an unaligned L1 entry and one with reserved bits', async (t) => {
  const l = await Layout.load(await smallImage(t));
  const good = l.l1Entry(0);
  l.setL1Entry(0, good + 512n);
  await l.save();
  await onlyFirstRangeFails(t, l.file, ErrorCodes.CORRUPT, /not aligned/);
  l.setL1Entry(0, good | (1n << 58n));
  await l.save();
  await onlyFirstRangeFails(t, l.file, ErrorCodes.CORRUPT, /reserved bits/);
});

test('L2 entries with reserved bits, unaligned, or past the end of the file', async (t) => {
  const l = await Layout.load(await smallImage(t));
  const good = l.l2Entry(0);
  for (const [bad, message] of [
    [good | (1n << 57n), /reserved bits/],
    [good | 2n, /reserved bits/],
    [good + 1024n, /not aligned/],
    [COPIED | (1n << 45n), /past the end of the image file/],
  ] as const) {
    l.setL2Entry(0, bad);
    await l.save();
    const image = await open(l.file, { readOnly: true });
    await t.throwsAsync(readRange(image, 0, 4096), { code: ErrorCodes.CORRUPT, message });
    // The second cluster of the same L2 table is intact.
    t.true((await readRange(image, 4096, 4096)).equals(Buffer.alloc(4096, 1)));
    await image.close();
  }
});

test('extended L2 entries marking a subcluster both allocated and zero, or allocated without a host cluster', async (t) => {
  const l = await Layout.load(await smallImage(t, 'cluster_size=16384,extended_l2=on'));
  const raw = l.l2Entry(0, 16);
  const bitmapAt = l.l2EntryAt(0, 16) + 8;
  const bitmap = l.bytes.readBigUInt64BE(bitmapAt);
  l.bytes.writeBigUInt64BE(bitmap | (1n << 32n), bitmapAt);
  await l.save();
  const image = await open(l.file, { readOnly: true });
  await t.throwsAsync(readRange(image, 0, 512), { code: ErrorCodes.CORRUPT, message: /both allocated and zero/ });
  await image.close();
  l.bytes.writeBigUInt64BE(bitmap, bitmapAt);
  l.setL2Entry(0, raw & ~0x00fffffffffffe00n, 16);
  await l.save();
  const again = await open(l.file, { readOnly: true });
  await t.throwsAsync(readRange(again, 0, 512), { code: ErrorCodes.CORRUPT, message: /without a host offset/ });
  await again.close();
});

for (const type of ['zlib', 'zstd'] as const) {
  test(`${type}: compressed descriptors past the end of the file, and garbage compressed data`, async (t) => {
    const dir = await tempDir(t);
    const source = path.join(dir, 's.raw');
    const content = Buffer.alloc(1 << 20);
    for (let i = 0; i < content.length; i += 64) content.write(`line ${i}\n`, i);
    await writeFile(source, content);
    const file = path.join(dir, 'c.qcow2');
    await qemuImg('convert', '-c', '-O', 'qcow2', '-o', `compression_type=${type},cluster_size=65536`, source, file);
    const l = await Layout.load(file);
    const descriptor = l.l2Entry(0);
    t.true((descriptor & COMPRESSED) !== 0n);
    const x = BigInt(62 - (l.clusterBits - 8));
    const dataOffset = Number(descriptor & ((1n << x) - 1n));
    l.setL2Entry(0, COMPRESSED | (3n << x) | BigInt(l.bytes.length + 4096));
    await l.save();
    let image = await open(file, { readOnly: true });
    await t.throwsAsync(readRange(image, 0, 100), { code: ErrorCodes.CORRUPT, message: /outside the image file/ });
    t.true((await readRange(image, 65536, 65536)).equals(content.subarray(65536, 131072)));
    await image.close();
    l.setL2Entry(0, descriptor);
    patternBytes(300, 9).copy(l.bytes, dataOffset);
    await l.save();
    image = await open(file, { readOnly: true });
    await t.throwsAsync(readRange(image, 0, 65536), { code: ErrorCodes.CORRUPT, message: /compressed cluster/ });
    await t.throwsAsync(readRange(image, 10, 20), { code: ErrorCodes.CORRUPT });
    await image.close();
  });
}

test('a compressed cluster of an extended L2 image with a subcluster bitmap', async (t) => {
  const dir = await tempDir(t);
  const source = path.join(dir, 's.raw');
  await writeFile(source, Buffer.alloc(256 * 1024, 'compressible '));
  const file = path.join(dir, 'c.qcow2');
  await qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=65536', source, file);
  const l = await Layout.load(file);
  t.true((l.l2Entry(1, 16) & COMPRESSED) !== 0n);
  const bitmapAt = l.l2EntryAt(1, 16) + 8;
  l.bytes.writeBigUInt64BE(1n, bitmapAt);
  await l.save();
  const image = await open(file, { readOnly: true });
  await t.throwsAsync(readRange(image, 65536, 4096), { code: ErrorCodes.CORRUPT, message: /zero subcluster bitmap/ });
  t.true((await readRange(image, 0, 65536)).equals(Buffer.alloc(65536, 'compressible ')));
  await image.close();
});

test('an L1 table larger than the limit, or past the end of the file', async (t) => {
  const file = await smallImage(t);
  const bytes = await readFile(file);
  bytes.writeUInt32BE(0x10000000, 36);
  await writeFile(file, bytes);
  await t.throwsAsync(open(file, { readOnly: true }), { code: ErrorCodes.INVALID_HEADER, message: /L1/ });
  bytes.writeUInt32BE(4, 36);
  bytes.writeBigUInt64BE(BigInt(1 << 30), 40);
  await writeFile(file, bytes);
  await t.throwsAsync(open(file, { readOnly: true }), { code: ErrorCodes.INVALID_HEADER, message: /L1/ });
});

test('backing loops are refused (qemu-img would hang on them)', async (t) => {
  const dir = await tempDir(t);
  const a = path.join(dir, 'a.qcow2');
  const b = path.join(dir, 'b.qcow2');
  await qemuImg('create', '-f', 'qcow2', a, '1M');
  await qemuImg('create', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', b, '1M');
  await qemuImg('rebase', '-u', '-b', 'b.qcow2', '-F', 'qcow2', a);
  await t.throwsAsync(open(a, { readOnly: true, followFileNames: true }), { code: ErrorCodes.BACKING_LOOP, message: /a\.qcow2/ });
  await t.throwsAsync(open(b, { readOnly: true, followFileNames: true }), { code: ErrorCodes.BACKING_LOOP });
  await qemuImg('rebase', '-u', '-b', 'a.qcow2', '-F', 'qcow2', a);
  await t.throwsAsync(open(a, { readOnly: true, followFileNames: true }), { code: ErrorCodes.BACKING_LOOP });
});

test('a backing file that is a FIFO or a directory is refused instead of hanging', async (t) => {
  const dir = await tempDir(t);
  const top = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-u', '-b', 'fifo', '-F', 'raw', top, '1M');
  await runProgram('mkfifo', [path.join(dir, 'fifo')]);
  await t.throwsAsync(open(top, { readOnly: true, followFileNames: true }), { code: ErrorCodes.INVALID_ARGUMENT, message: /fifo.*not a regular file/ });
  await qemuImg('rebase', '-u', '-b', dir, '-F', 'qcow2', top);
  await t.throwsAsync(open(top, { readOnly: true, followFileNames: true }), { code: ErrorCodes.INVALID_ARGUMENT });
  await qemuImg('rebase', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', top);
  await t.throwsAsync(open(top, { readOnly: true, followFileNames: true }), { code: 'ENOENT' });
});

test('a data cluster cut short by the end of the file reads its missing part as zeros', async (t) => {
  const file = path.join(await tempDir(t), 'cut.qcow2');
  await qemuImg('create', '-f', 'qcow2', file, '1M');
  await qemuIo(file, '-c', 'write -P 6 0 64k', '-c', 'write -P 7 512k 64k');
  const l = await Layout.load(file);
  const lastCluster = Number(l.l2Entry(8) & 0x00fffffffffffe00n);
  t.is(lastCluster + 65536, l.bytes.length);
  await truncate(file, lastCluster + 32768);
  const image = await open(file, { readOnly: true });
  const expected = Buffer.concat([Buffer.alloc(32768, 7), Buffer.alloc(32768)]);
  for (let i = 0; i < 3; i++) {
    // Aligned buffers once the table is cached take the io_uring way, whose short read is finished by the pool.
    const aligned = allocAligned(65536);
    await image.read(aligned, 512 * 1024);
    t.true(aligned.equals(expected));
  }
  t.true((await readRange(image, 512 * 1024, 65536)).equals(expected));
  t.true((image as Qcow2Image).engine.info.directReads >= 2);
  await image.close();
});

test('chains deeper than the limit are refused', async (t) => {
  const dir = await tempDir(t);
  const names = Array.from({ length: 67 }, (_, i) => path.join(dir, `l${i}.qcow2`));
  await qemuImg('create', '-f', 'qcow2', names[0], '1M');
  await qemuIo(names[0], '-c', 'write -P 3 0 512');
  for (let i = 1; i < names.length; i++) {
    await qemuImg('create', '-f', 'qcow2', '-u', '-b', path.basename(names[i - 1]), '-F', 'qcow2', names[i], '1M');
  }
  const options = { readOnly: true, followFileNames: true };
  await t.throwsAsync(open(names[4], { ...options, maxChainDepth: 3 }), { code: ErrorCodes.CHAIN_TOO_DEEP, message: /3/ });
  const four = await open(names[4], { ...options, maxChainDepth: 4 });
  t.true((await readRange(four, 0, 512)).equals(Buffer.alloc(512, 3)));
  await four.close();
  // The default allows an image and 64 backing layers: l64 opens, l66 does not.
  const deepest = await open(names[64], options);
  t.true((await readRange(deepest, 0, 1024)).equals(Buffer.concat([Buffer.alloc(512, 3), Buffer.alloc(512)])));
  await deepest.close();
  await t.throwsAsync(open(names[66], options), { code: ErrorCodes.CHAIN_TOO_DEEP });
});

test('random corruption of the metadata never crashes: every failure is a Qcow2Error with a code', async (t) => {
  const file = await smallImage(t);
  await qemuIo(file, '-c', 'write -P 5 1M 12k', '-c', 'write -z 2M 8k');
  const pristine = await readFile(file);
  const l = new Layout(file, pristine);
  const metadataStart = l.l1Offset;
  const metadataEnd = Math.min(pristine.length, 16 * 4096);
  const noise = patternBytes(4 * 400, 77);
  let failures = 0;
  for (let round = 0; round < 400; round++) {
    const bytes = Buffer.from(pristine);
    for (let k = 0; k < 4; k++) {
      const at = metadataStart + ((noise[round * 4 + k] * 7919 + round * 104729) % (metadataEnd - metadataStart));
      bytes[at] ^= 1 << (noise[(round * 4 + k + 1) % noise.length] & 7);
    }
    await writeFile(file, bytes);
    try {
      const image = await open(file, { readOnly: true });
      try {
        await Promise.all([readRange(image, 0, image.size), allExtents(image)]);
      } finally {
        await image.close();
      }
    } catch (error) {
      failures++;
      t.true(error instanceof Qcow2Error && typeof error.code === 'string' && error.code.length > 0, String(error));
    }
  }
  t.true(failures > 0);
});

test('a FIFO is refused at once, whatever the format asked, instead of waiting for a writer', async (t) => {
  const dir = await tempDir(t);
  const fifo = path.join(dir, 'pipe');
  t.is((await runProgram('mkfifo', [fifo])).code, 0);
  for (const format of [undefined, 'raw', 'qcow2'] as const) {
    const error = await t.throwsAsync(open(fifo, { format }), { instanceOf: Qcow2Error });
    t.is(error?.code, ErrorCodes.INVALID_ARGUMENT, `format ${format}`);
    t.regex(error?.message ?? '', /'file' driver requires '.*pipe' to be a regular file/);
  }
});

test('an external data file cluster mapped away from its guest offset is corrupt, for us as for qemu-io', async (t) => {
  const file = await smallImage(t, `cluster_size=4096,data_file=${path.join(await tempDir(t), 'data.raw')}`);
  const l = await Layout.load(file);
  t.is(l.l2Entry(1), COPIED | 4096n, 'qemu maps guest cluster 1 at host offset 4096 of the data file');
  l.setL2Entry(1, COPIED | (4n << 20n));
  await l.save();
  const image = await open(file, { readOnly: true, followFileNames: true });
  try {
    await t.throwsAsync(readRange(image, 4096, 4096), { code: ErrorCodes.CORRUPT, message: /does not match the guest cluster offset 4096/ });
    t.true((await readRange(image, 0, 4096)).equals(Buffer.alloc(4096, 1)), 'cluster 0 still reads');
  } finally {
    await image.close();
  }
  const [ours, theirs] = [await qcow2Cli('io', '-r', '-c', 'read 4k 4k', file), await runProgram('qemu-io', ['-r', '-c', 'read 4k 4k', file])];
  t.is(ours.stdout, theirs.stdout);
  t.is(ours.stdout, 'read failed: Input/output error\n');
  t.is(ours.code, theirs.code);
});
