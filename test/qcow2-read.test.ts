/** Reading qcow2 images made by qemu-img/qemu-io: every cluster kind, chains, data files, compression. */
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes, Extent, Image, Qcow2Image, Qcow2OpenOptions, allocAligned, open, openQcow2 } from '../ts/index.js';
import { patternBytes, qemuImg, qemuIo, tempDir } from './helpers/qemu.js';

/** Open an image the way the CLI does: following its file names. */
function openChain(file: string, options: { cache?: 'none' | 'writeback' } = {}): Promise<Image> {
  return open(file, { readOnly: true, followFileNames: true, ...options });
}

/** The whole disk through our API, read in requests of `chunk` bytes. */
async function readAll(image: Image, chunk = 3 << 20): Promise<Buffer> {
  const out = Buffer.alloc(image.size);
  const reads: Promise<void>[] = [];
  for (let pos = 0; pos < image.size; pos += chunk) {
    reads.push(image.read(out.subarray(pos, Math.min(pos + chunk, image.size)), pos));
  }
  await Promise.all(reads);
  return out;
}

/** Assert two buffers are equal, naming the first byte that differs. */
function sameBytes(t: ExecutionContext, actual: Buffer, expected: Buffer, what: string): void {
  t.is(actual.length, expected.length, `${what}: length`);
  if (actual.equals(expected)) {
    t.pass();
    return;
  }
  let i = 0;
  while (i < actual.length && actual[i] === expected[i]) i++;
  t.fail(`${what}: first difference at byte ${i} (got ${actual[i]}, qemu-img has ${expected[i]})`);
}

/** A run of the disk as qemu-img map and extents() both can describe it. */
interface Coverage {
  start: number;
  length: number;
  kind: string;
  depth: number;
  offset?: number;
}

interface QemuMapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** Merge runs that continue each other, so that both sides' different run boundaries compare equal. */
function merged(runs: Coverage[]): Coverage[] {
  const out: Coverage[] = [];
  for (const r of runs) {
    const last = out[out.length - 1];
    const offsetsContinue =
      last !== undefined &&
      (last.offset === undefined ? r.offset === undefined : r.offset === last.offset + last.length);
    if (last && last.kind === r.kind && last.depth === r.depth && offsetsContinue && last.start + last.length === r.start) {
      last.length += r.length;
    } else {
      out.push({ ...r });
    }
  }
  return out;
}

async function qemuCoverage(file: string): Promise<Coverage[]> {
  const entries = JSON.parse(await qemuImg('map', '--output=json', file)) as QemuMapEntry[];
  return merged(
    entries.map((e) => ({
      start: e.start,
      length: e.length,
      kind: e.data ? 'data' : e.present ? 'zero' : 'unallocated',
      depth: e.depth,
      ...(e.data && e.offset !== undefined ? { offset: e.offset } : {}),
    })),
  );
}

async function ourCoverage(image: Image): Promise<Coverage[]> {
  const runs: Coverage[] = [];
  for await (const e of image.extents()) {
    runs.push({
      start: e.offset,
      length: e.length,
      kind: e.kind,
      depth: e.depth,
      ...(e.kind === 'data' && !e.compressed && e.hostOffset !== undefined ? { offset: e.hostOffset } : {}),
    });
  }
  return merged(runs);
}

/** The image reads exactly as `qemu-img convert -O raw` writes it, and maps as `qemu-img map` does. */
async function matchesQemu(t: ExecutionContext, file: string, options: { coverage?: boolean; chunk?: number } = {}) {
  const raw = `${file}.expected.raw`;
  await qemuImg('convert', '-O', 'raw', file, raw);
  const expected = await readFile(raw);
  const image = await openChain(file);
  try {
    sameBytes(t, await readAll(image, options.chunk), expected, path.basename(file));
    if (options.coverage !== false) t.deepEqual(await ourCoverage(image), await qemuCoverage(file));
  } finally {
    await image.close();
  }
}

/** qemu-io commands writing deterministic patterns: [offset, length] pairs, each with its own pattern byte. */
function writes(ranges: [number, number][]): string[] {
  return ranges.flatMap(([off, len], i) => ['-c', `write -P ${(i * 37 + 11) & 0xff} ${off} ${len}`]);
}

test('every cluster kind of a version 3 image: data, zero with and without host cluster, unallocated', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'kinds.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-o', 'preallocation=metadata', file, '4M');
  // With metadata preallocation every cluster has a host cluster; -z keeps it (zero flag with offset).
  await qemuIo(file, ...writes([[0, 100000], [1 << 20, 4096]]), '-c', 'write -z 65536 65536', '-c', 'discard 2M 1M');
  await qemuIo(file, '-c', 'write -z -u 3M 128k');
  await matchesQemu(t, file);
  const sparse = path.join(dir, 'sparse.qcow2');
  await qemuImg('create', '-f', 'qcow2', sparse, '3000000');
  await qemuIo(sparse, ...writes([[7, 70001], [200000, 1], [2999999, 1]]), '-c', 'write -z 1M 300000');
  await matchesQemu(t, sparse, { chunk: 65536 + 13 });
});

for (const [clusterSize, refcountBits] of [
  [512, 1],
  [4096, 2],
  [65536, 16],
  [65536, 64],
  [2 << 20, 8],
] as const) {
  test(`cluster size ${clusterSize} with ${refcountBits}-bit refcounts`, async (t) => {
    const dir = await tempDir(t);
    const file = path.join(dir, 'c.qcow2');
    const opts = `cluster_size=${clusterSize},refcount_bits=${refcountBits}`;
    await qemuImg('create', '-f', 'qcow2', '-o', opts, file, '20M');
    await qemuIo(file, ...writes([[0, 1000], [clusterSize * 3 + 5, clusterSize * 2], [15 << 20, 70000], [(20 << 20) - 512, 512]]));
    await matchesQemu(t, file);
  });
}

test('version 2 images (compat=0.10)', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'v2.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-o', 'compat=0.10', file, '5M');
  await qemuIo(file, ...writes([[4096, 300000], [4 << 20, 65536]]), '-c', 'write -z 2M 64k');
  const image = (await openChain(file)) as Qcow2Image;
  t.is(image.header.version, 2);
  await image.close();
  await matchesQemu(t, file);
});

test('a chain of depth 3 mixing raw and qcow2, with a shorter backing image', async (t) => {
  const dir = await tempDir(t);
  const base = path.join(dir, 'base.raw');
  const mid = path.join(dir, 'mid.qcow2');
  const top = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-f', 'raw', base, '2M');
  await qemuIo('-f', 'raw', base, ...writes([[0, 1 << 20], [(2 << 20) - 4096, 4096]]));
  await qemuImg('create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', mid, '4M');
  await qemuIo(mid, ...writes([[65536, 65536], [3 << 20, 4096]]), '-c', 'write -z 196608 65536');
  await qemuImg('create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top, '6M');
  await qemuIo(top, ...writes([[100, 65536], [(5 << 20) + 3, 10]]), '-c', 'write -z 512k 64k');
  await matchesQemu(t, top);
  const image = (await openChain(top)) as Qcow2Image;
  t.is(image.backing?.format, 'qcow2');
  t.is((image.backing as Qcow2Image).backing?.format, 'raw');
  const extents: Extent[] = [];
  for await (const e of image.extents()) extents.push(e);
  t.true(extents.some((e) => e.depth === 2 && e.kind === 'data' && e.file === base));
  // A window of the disk maps as the same runs, clipped to it.
  const [from, to] = [70000, (3 << 20) + 5000];
  const clipped = extents
    .filter((e) => e.offset < to && e.offset + e.length > from)
    .map((e) => {
      const start = Math.max(e.offset, from);
      const shift = start - e.offset;
      const out = { ...e, offset: start, length: Math.min(e.offset + e.length, to) - start };
      if (e.hostOffset !== undefined) out.hostOffset = e.hostOffset + shift;
      return out;
    });
  const windowed: Extent[] = [];
  for await (const e of image.extents({ offset: from, length: to - from })) windowed.push(e);
  t.deepEqual(windowed, clipped);
  await image.close();
});

test('external data files, with and without data_file_raw, and under an overlay with a backing image', async (t) => {
  const dir = await tempDir(t);
  for (const rawFlag of ['off', 'on']) {
    const file = path.join(dir, `d-${rawFlag}.qcow2`);
    const dataFile = path.join(dir, `d-${rawFlag}.data`);
    await qemuImg('create', '-f', 'qcow2', '-o', `data_file=${dataFile},data_file_raw=${rawFlag}`, file, '3M');
    await qemuIo(file, ...writes([[4096, 200000], [2 << 20, 65536]]), '-c', 'write -z 1M 64k');
    await matchesQemu(t, file);
    const image = (await openChain(file)) as Qcow2Image;
    t.is(image.dataFilePath, dataFile);
    const first = (await image.extents()[Symbol.asyncIterator]().next()).value as Extent;
    t.is(first.file, image.dataFilePath);
    // With its table cached, an aligned read goes straight to the data file.
    const expected = await readFile(`${file}.expected.raw`);
    for (const offset of [8192, 2 << 20, 8192]) {
      const buf = allocAligned(65536);
      await image.read(buf, offset);
      t.true(buf.equals(expected.subarray(offset, offset + 65536)));
    }
    t.true(image.engine.info.directReads > 0);
    await image.close();
  }
  // A data file under an overlay's own clusters, over a backing image.
  const base = path.join(dir, 'base.qcow2');
  await qemuImg('create', '-f', 'qcow2', base, '2M');
  await qemuIo(base, '-c', 'write -P 9 0 2M');
  const top = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-o', `data_file=${path.join(dir, 'top.data')}`, '-b', 'base.qcow2', '-F', 'qcow2', top, '3M');
  await qemuIo(top, ...writes([[65536, 65536], [(2 << 20) + 5, 100]]), '-c', 'write -z 256k 64k');
  await matchesQemu(t, top);
});

test('extended L2 entries with partial subcluster writes, zero subclusters and a backing image', async (t) => {
  const dir = await tempDir(t);
  const base = path.join(dir, 'base.qcow2');
  const file = path.join(dir, 'ext.qcow2');
  await qemuImg('create', '-f', 'qcow2', base, '2M');
  await qemuIo(base, '-c', 'write -P 0x5a 0 2M');
  await qemuImg('create', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'base.qcow2', '-F', 'qcow2', file, '2M');
  // Subclusters are 2 KiB: these writes allocate some subclusters of a cluster and leave others to the backing.
  await qemuIo(file, ...writes([[2048, 2048], [10240, 100], [65536 + 30000, 5000], [1 << 20, 65536]]));
  await qemuIo(file, '-c', 'write -z 6144 4096', '-c', 'write -z -u 131072 2048', '-c', 'discard 1M 2048');
  await matchesQemu(t, file, { chunk: 1000 });
  const alone = path.join(dir, 'alone.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=32k', alone, '1M');
  await qemuIo(alone, ...writes([[1024, 1024], [5000, 30000]]), '-c', 'write -z 40960 1024');
  await matchesQemu(t, alone);
});

for (const type of ['zlib', 'zstd'] as const) {
  test(`${type}-compressed images, alone and under an overlay`, async (t) => {
    const dir = await tempDir(t);
    const source = path.join(dir, 'source.raw');
    const content = Buffer.alloc(3 << 20);
    for (let i = 0; i < content.length; i += 4096) content.write(`block ${i} of a compressible disk\n`, i);
    patternBytes(200000, 3).copy(content, 1 << 20); // incompressible: stored uncompressed
    await writeFile(source, content);
    const file = path.join(dir, 'c.qcow2');
    await qemuImg('convert', '-c', '-O', 'qcow2', '-o', `compression_type=${type},cluster_size=65536`, source, file);
    await matchesQemu(t, file, { chunk: 10007 });
    const image = (await openChain(file)) as Qcow2Image;
    t.is(image.header.compressionType, type);
    let compressed = 0;
    for await (const e of image.extents()) if (e.compressed) compressed++;
    t.true(compressed > 10);
    await image.close();
    const overlay = path.join(dir, 'o.qcow2');
    await qemuImg('create', '-f', 'qcow2', '-b', 'c.qcow2', '-F', 'qcow2', overlay);
    await qemuIo(overlay, ...writes([[70000, 1000], [2 << 20, 65536]]));
    await matchesQemu(t, overlay, { chunk: 4096 });
  });
}

test('a 2 TiB sparse image with clusters written far apart', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'big.qcow2');
  const size = 2 ** 41;
  await qemuImg('create', '-f', 'qcow2', file, String(size));
  const places = [0, 2 ** 40 + 12345, size - 65536, 2 ** 39];
  await qemuIo(file, ...places.map((off, i) => ['-c', `write -P ${i + 1} ${off} 65536`]).flat());
  const image = await openChain(file);
  t.is(image.size, size);
  for (const [i, off] of places.entries()) {
    const buf = Buffer.alloc(3 * 65536);
    const start = Math.max(0, Math.min(off - 65536, size - buf.length));
    await image.read(buf, start);
    const expected = Buffer.alloc(buf.length);
    expected.fill(i + 1, off - start, off - start + 65536);
    sameBytes(t, buf, expected, `region at ${off}`);
  }
  t.deepEqual(await ourCoverage(image), await qemuCoverage(file));
  await image.close();
});

test('many parallel reads of random ranges equal the raw conversion, with and without O_DIRECT, with a tiny L2 cache', async (t) => {
  const dir = await tempDir(t);
  const base = path.join(dir, 'base.qcow2');
  const file = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=4096', base, '8M');
  await qemuIo(base, ...writes([[0, 3 << 20], [5 << 20, 1 << 20]]));
  await qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=16384', '-b', 'base.qcow2', '-F', 'qcow2', file, '8M');
  await qemuIo(file, ...writes([[1 << 20, 1 << 20], [(4 << 20) + 100, 300000]]), '-c', 'write -z 2M 64k');
  const raw = path.join(dir, 'top.raw');
  await qemuImg('convert', '-O', 'raw', file, raw);
  const expected = await readFile(raw);
  const configs: Qcow2OpenOptions[] = [{ cache: 'none' }, { cache: 'writeback' }, { cache: 'none', l2CacheSize: 1024, l2SliceSize: 512 }];
  for (const config of configs) {
    const image = await openQcow2(file, { readOnly: true, followFileNames: true, ...config });
    const ranges = Array.from({ length: 400 }, (_, i) => {
      const off = (i * 2654435761) % (expected.length - 1);
      return [off, 1 + ((i * 40503) % Math.min(300000, expected.length - off))];
    });
    const buffers = await Promise.all(
      ranges.map(async ([off, len]) => {
        const buf = Buffer.alloc(len);
        await image.read(buf, off);
        return buf;
      }),
    );
    const bad = ranges.findIndex(([off, len], i) => !buffers[i].equals(expected.subarray(off, off + len)));
    t.is(bad, -1, `${JSON.stringify(config)}: read ${bad} (${ranges[bad]}) differs`);
    await image.close();
  }
});

test('aligned reads from cached tables skip the worker pool and equal the raw conversion', async (t) => {
  const dir = await tempDir(t);
  const base = path.join(dir, 'base.qcow2');
  const file = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-f', 'qcow2', base, '8M');
  await qemuIo(base, ...writes([[0, 8 << 20]]));
  await qemuImg('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', file, '12M');
  await qemuIo(file, ...writes([[1 << 20, 3 << 20], [9 << 20, 65536], [(10 << 20) + 8192, 4096]]), '-c', 'write -z 6M 64k');
  const raw = path.join(dir, 'top.raw');
  await qemuImg('convert', '-O', 'raw', file, raw);
  const expected = await readFile(raw);
  const image = (await openChain(file)) as Qcow2Image;
  // The first pass loads the L2 tables through the pool; the second finds them cached.
  for (let pass = 0; pass < 2; pass++) {
    const reads = Array.from({ length: 300 }, async (_, i) => {
      const length = 4096 * (1 + (i % 16));
      const offset = Math.min(((i * 7919) % 3072) * 4096, expected.length - length);
      const buf = allocAligned(length);
      await image.read(buf, offset);
      return buf.equals(expected.subarray(offset, offset + length)) ? -1 : offset;
    });
    t.deepEqual((await Promise.all(reads)).filter((bad) => bad >= 0), [], `pass ${pass}: reads at these offsets differ`);
  }
  // Workers that start their next read as soon as one completes: those reads start while the
  // completions are being handled, and go to the ring together.
  let bad = 0;
  const before = image.engine.info.directReads;
  await Promise.all(
    Array.from({ length: 8 }, async (_, worker) => {
      const buf = allocAligned(8192);
      for (let i = 0; i < 100; i++) {
        const offset = (1 << 20) + ((worker * 131 + i * 17) % 384) * 8192;
        await image.read(buf, offset);
        if (!buf.equals(expected.subarray(offset, offset + 8192))) bad++;
      }
    }),
  );
  t.is(bad, 0);
  t.is(image.engine.info.directReads - before, 800, 'reads of data in cached tables all skip the pool');
  await image.close();
});

test('aligned reads over scattered clusters, zeros and holes are served in pieces without the pool', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'scattered.qcow2');
  await qemuImg('create', '-f', 'qcow2', file, '4M');
  // Written backwards, so that neighbouring guest clusters lie apart in the file.
  const clusters = [20, 19, 18, 16, 15, 13, 11, 10, 9, 8, 7, 6, 5, 3, 2, 1];
  await qemuIo(file, ...clusters.map((c) => ['-c', `write -P ${c} ${c * 65536} 65536`]).flat(), '-c', `write -z ${14 * 65536} 65536`);
  const raw = path.join(dir, 'scattered.raw');
  await qemuImg('convert', '-O', 'raw', file, raw);
  const expected = await readFile(raw);
  const image = (await openChain(file)) as Qcow2Image;
  await image.read(allocAligned(4096), 0); // loads the L2 table
  const before = image.engine.info.directReads;
  const ranges = [
    [0, 22 * 65536],
    [65536 + 4096, 8 * 65536],
    [13 * 65536 - 8192, 3 * 65536],
    [3 * 65536, 4096],
  ];
  for (const [offset, length] of ranges) {
    const buf = allocAligned(length);
    buf.fill(0xee);
    await image.read(buf, offset);
    t.true(buf.equals(expected.subarray(offset, offset + length)), `read ${offset}+${length}`);
  }
  t.is(image.engine.info.directReads - before, ranges.length);
  await image.close();
});

test('createReadStream yields the disk, and reads past the end are refused', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 's.qcow2');
  await qemuImg('create', '-f', 'qcow2', file, '3M');
  await qemuIo(file, ...writes([[12345, 100000], [2 << 20, 4096]]));
  const raw = path.join(dir, 's.raw');
  await qemuImg('convert', '-O', 'raw', file, raw);
  const image = await openChain(file);
  const chunks: Buffer[] = [];
  for await (const chunk of image.createReadStream({ start: 1000, end: (3 << 20) - 2, chunkSize: 70000 })) chunks.push(chunk);
  sameBytes(t, Buffer.concat(chunks), (await readFile(raw)).subarray(1000, (3 << 20) - 1), 'stream');
  await t.throwsAsync(image.read(Buffer.alloc(2), (3 << 20) - 1), { code: ErrorCodes.OUT_OF_BOUNDS });
  await image.close();
  await t.throwsAsync(image.read(Buffer.alloc(1), 0), { code: ErrorCodes.CLOSED });
  await t.throwsAsync(openQcow2(file, { l2SliceSize: 1000 }), { code: ErrorCodes.INVALID_ARGUMENT, message: /l2SliceSize/ });
  await t.throwsAsync(openQcow2(file, { l2CacheSize: -1 }), { code: ErrorCodes.INVALID_ARGUMENT, message: /l2CacheSize/ });
});

test('close() waits for the reads already running, then closes the whole chain', async (t) => {
  const dir = await tempDir(t);
  const base = path.join(dir, 'base.qcow2');
  const top = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-f', 'qcow2', base, '4M');
  await qemuIo(base, '-c', 'write -P 4 0 4M');
  await qemuImg('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top, '4M');
  const image = (await openChain(top)) as Qcow2Image;
  const reads = Array.from({ length: 64 }, async (_, i) => {
    const buf = Buffer.alloc(65536);
    await image.read(buf, i * 65536);
    return buf.equals(Buffer.alloc(65536, 4));
  });
  await image.close();
  t.deepEqual(await Promise.all(reads), Array(64).fill(true));
  await t.throwsAsync(image.read(Buffer.alloc(1), 0), { code: ErrorCodes.CLOSED });
  await t.throwsAsync(image.backing!.read(Buffer.alloc(1), 0), { code: ErrorCodes.CLOSED });
  await t.throwsAsync(image.read(new DataView(new ArrayBuffer(4)) as unknown as Uint8Array, 0), { code: ErrorCodes.CLOSED });
});

test('writes are refused by read-only images and taken by writable ones', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'w.qcow2');
  await qemuImg('create', '-f', 'qcow2', file, '1M');
  const ro = await open(file, { readOnly: true });
  await t.throwsAsync(ro.write(Buffer.alloc(512), 0), { code: ErrorCodes.READ_ONLY });
  await t.throwsAsync(ro.discard(0, 512), { code: ErrorCodes.READ_ONLY });
  await ro.close();
  const rw = await open(file);
  t.false(rw.readOnly);
  await rw.write(Buffer.alloc(512, 3), 0);
  const back = Buffer.alloc(512);
  await rw.read(back, 0);
  t.true(back.equals(Buffer.alloc(512, 3)));
  await rw.flush();
  await rw.close();
});

test('file names in the image are only followed when allowed', async (t) => {
  const dir = await tempDir(t);
  const base = path.join(dir, 'base.qcow2');
  const top = path.join(dir, 'top.qcow2');
  const withData = path.join(dir, 'data.qcow2');
  await qemuImg('create', '-f', 'qcow2', base, '1M');
  await qemuIo(base, '-c', 'write -P 7 0 64k');
  await qemuImg('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top, '1M');
  await qemuImg('create', '-f', 'qcow2', '-o', `data_file=${path.join(dir, 'data.bin')}`, withData, '1M');
  await t.throwsAsync(open(top, { readOnly: true }), { code: ErrorCodes.FILE_NAME_NOT_ALLOWED, message: /base\.qcow2.*followFileNames/ });
  await t.throwsAsync(open(withData, { readOnly: true }), { code: ErrorCodes.FILE_NAME_NOT_ALLOWED, message: /data\.bin/ });
  // Without its backing image, the overlay's unallocated clusters read as zeros.
  const alone = await open(top, { readOnly: true, backing: false });
  const buf = Buffer.alloc(65536, 1);
  await alone.read(buf, 0);
  t.true(buf.equals(Buffer.alloc(65536)));
  await alone.close();
  const chained = await open(top, { readOnly: true, followFileNames: true });
  await chained.read(buf, 0);
  t.true(buf.equals(Buffer.alloc(65536, 7)));
  await chained.close();
});

test('a dirty image opens read-only as it is, and writable after its refcounts are rebuilt', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'dirty.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', file, '1M');
  await qemuIo(file, '-c', 'write -P 9 0 4096');
  const bytes = await readFile(file);
  bytes[79] |= 1; // incompatible feature bit 0: dirty
  await writeFile(file, bytes);
  const image = await open(file, { readOnly: true });
  const buf = Buffer.alloc(4096);
  await image.read(buf, 0);
  t.true(buf.equals(Buffer.alloc(4096, 9)));
  await image.close();
  const writable = await open(file);
  await writable.close();
  t.is((await readFile(file))[79] & 1, 0);
});
