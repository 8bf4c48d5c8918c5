/**
 * Writes served on the JS thread through io_uring (native/qcow2/direct_writes.cc): writes into
 * clusters the image owns, and into fresh clusters allocated in memory. Each workload runs through
 * that path (counted by engine.info.directWrites) and through the pool (a child process with
 * QCOW2_IO_URING=0), and against qemu-io on a twin image: the images must read the same and
 * pass qemu-img check without errors or leaks. Concurrent overlapping writes, zero writes and
 * discards on the same clusters are checked sector by sector against what each sector may hold.
 */
import { execFile } from 'node:child_process';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';

import test, { ExecutionContext } from 'ava';

import { Qcow2Image, allocAligned, openQcow2 } from '../ts/index.js';
import { l2Entry } from './helpers/check-images.js';
import { qemuImg, qemuIo, tempDir } from './helpers/qemu.js';
import { random } from './helpers/random.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SECTOR = 512;
const INDEX = path.join(__dirname, '..', 'ts', 'index.js');

/** A write of `length` bytes of `pattern` at `offset`. */
interface Write {
  offset: number;
  length: number;
  pattern: number;
}

/** An aligned buffer of `length` bytes of `pattern` (O_DIRECT takes it as it is). */
function alignedPattern(length: number, pattern: number): Buffer {
  const buffer = allocAligned(length);
  buffer.fill(pattern);
  return buffer;
}

/** Apply `writes` `depth` at a time (those in flight together never overlap, so the result is fixed). */
async function applyInWaves(image: Qcow2Image, writes: Write[], depth: number): Promise<void> {
  for (let i = 0; i < writes.length; i += depth) {
    await Promise.all(writes.slice(i, i + depth).map((w) => image.write(alignedPattern(w.length, w.pattern), w.offset)));
  }
}

/** The same writes through qemu-io, in order. */
async function applyQemu(file: string, writes: Write[]): Promise<void> {
  const args = writes.flatMap((w) => ['-c', `write -q -P ${w.pattern} ${w.offset} ${w.length}`]);
  for (let i = 0; i < args.length; i += 400) await qemuIo('-f', 'qcow2', ...args.slice(i, i + 400), file);
}

async function assertClean(t: ExecutionContext, file: string): Promise<void> {
  const out = await qemuImg('check', '--output=json', file);
  const r = JSON.parse(out) as { corruptions?: number; leaks?: number; 'check-errors'?: number };
  t.is(r.corruptions ?? 0, 0, out);
  t.is(r.leaks ?? 0, 0, out);
  t.is(r['check-errors'] ?? 0, 0, out);
}

/** Writes that do not overlap within any `depth` consecutive ones: `count` of them, 4 KiB-aligned, some across clusters. */
function disjointWrites(seed: number, count: number, size: number, clusterSize: number, depth: number): Write[] {
  const rnd = random(seed);
  const writes: Write[] = [];
  while (writes.length < count) {
    const wave: Write[] = [];
    while (wave.length < depth && writes.length + wave.length < count) {
      const length = 4 * KiB * (1 + Math.floor(rnd() * (rnd() < 0.3 ? (2 * clusterSize) / (4 * KiB) : 2)));
      const offset = Math.min(Math.floor((rnd() * size) / (4 * KiB)) * 4 * KiB, size - length);
      if (wave.some((w) => w.offset < offset + length && offset < w.offset + w.length)) continue;
      wave.push({ offset, length, pattern: 1 + Math.floor(rnd() * 254) });
    }
    writes.push(...wave);
  }
  return writes;
}

/**
 * 4 KiB at the start of every `stride` bytes (at least two clusters), and 8 KiB across the end of
 * that first cluster for every fourth: each allocates, and none overlaps another.
 */
function allocatingWrites(count: number, stride: number, clusterSize: number): Write[] {
  const writes: Write[] = [];
  for (let i = 0; i < count; i++) {
    const across = i % 4 === 3;
    writes.push({
      offset: i * stride + (across ? clusterSize - 4 * KiB : 0),
      length: across ? 8 * KiB : 4 * KiB,
      pattern: 1 + (i % 250),
    });
  }
  return writes;
}

/** Run `writes` in a child process with io_uring turned off: the pool path. Resolves to its directWrites count. */
async function applyThroughPool(dir: string, file: string, writes: Write[], depth: number): Promise<number> {
  const script = path.join(dir, 'pool-writes.js');
  await writeFile(
    script,
    `const { openQcow2, allocAligned } = require(${JSON.stringify(INDEX)});
(async () => {
  const writes = ${JSON.stringify(writes)};
  const image = await openQcow2(${JSON.stringify(file)}, { cache: 'none' });
  for (let i = 0; i < writes.length; i += ${depth}) {
    await Promise.all(writes.slice(i, i + ${depth}).map((w) => {
      const b = allocAligned(w.length);
      b.fill(w.pattern);
      return image.write(b, w.offset);
    }));
  }
  process.stdout.write(String(image.engine.info.directWrites));
  await image.close();
})().catch((e) => { console.error(e); process.exit(1); });
`,
  );
  const { stdout } = await promisify(execFile)(process.execPath, [script], { env: { ...process.env, QCOW2_IO_URING: '0' } });
  return Number(stdout);
}

/** Our image through io_uring, a twin through the pool and one through qemu-io: all three read the same and check clean. */
async function threeWays(t: ExecutionContext, dir: string, base: string, writes: Write[], depth: number): Promise<number> {
  const pooled = path.join(dir, 'pool.qcow2');
  const theirs = path.join(dir, 'qemu.qcow2');
  await copyFile(base, pooled);
  await copyFile(base, theirs);
  const image = await openQcow2(base, { cache: 'none' });
  await applyInWaves(image, writes, depth);
  const direct = image.engine.info.directWrites;
  await image.close();
  t.is(await applyThroughPool(dir, pooled, writes, depth), 0, 'QCOW2_IO_URING=0 sends every write to the pool');
  await applyQemu(theirs, writes);
  await qemuImg('compare', '-f', 'qcow2', '-F', 'qcow2', base, theirs);
  await qemuImg('compare', '-f', 'qcow2', '-F', 'qcow2', pooled, theirs);
  await assertClean(t, base);
  await assertClean(t, pooled);
  return direct;
}

test('writes into a preallocated image go through io_uring and read like the pool path and qemu-io', async (t) => {
  const dir = await tempDir(t);
  for (const prealloc of ['metadata', 'falloc']) {
    const file = path.join(dir, `${prealloc}.qcow2`);
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', `preallocation=${prealloc}`, file, '8M');
    const writes = disjointWrites(11, 160, 8 * MiB, 64 * KiB, 16);
    const direct = await threeWays(t, dir, file, writes, 16);
    // Only the requests of the first wave, sent before the L2 slice was cached, take the pool.
    t.true(direct >= writes.length - 16, `${direct} of ${writes.length} writes went through io_uring (${prealloc})`);
  }
});

test('allocating writes into an empty image go through io_uring, one fresh cluster each, and leak nothing', async (t) => {
  const dir = await tempDir(t);
  for (const options of ['cluster_size=65536', 'cluster_size=65536,extended_l2=on', 'cluster_size=4096,refcount_bits=1']) {
    const file = path.join(dir, 'empty.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', options, file, '256M');
    const clusterSize = /cluster_size=(\d+)/.exec(options)![1];
    const cs = Number(clusterSize);
    const stride = Math.max(2 * cs, 64 * KiB);
    const writes = allocatingWrites(600, stride, cs);
    // Rewrites of clusters allocated earlier land in place.
    writes.push(...allocatingWrites(100, stride, cs).map((w) => ({ ...w, pattern: 255 - w.pattern })));
    const direct = await threeWays(t, dir, file, writes, 16);
    t.true(direct > writes.length / 2, `${direct} of ${writes.length} writes went through io_uring (${options})`);
  }
});

test('a commit that falls due on the io_uring path writes the mappings back before the writes resolve', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'slices.qcow2');
  // 4 KiB clusters, 512-byte slices: an L2 table maps 2 MiB in 8 slices. qemu-io makes the tables
  // (a new table's slices are all dirty at once); each write below then dirties one slice of its own.
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', file, '3G');
  const count = 1030;
  const tables = Array.from({ length: count }, (_, i) => ['-c', `write -q -P 1 ${i * 2 * MiB} 4k`]).flat();
  for (let i = 0; i < tables.length; i += 400) await qemuIo('-f', 'qcow2', ...tables.slice(i, i + 400), file);
  const writes = Array.from({ length: count }, (_, i) => ({ offset: i * 2 * MiB + MiB, length: 4 * KiB, pattern: 1 + (i % 250) }));
  const image = await openQcow2(file, { cache: 'none', l2SliceSize: 512 });
  // Reads bring the slices into the cache, so that the writes can be planned on the JS thread.
  for (const w of writes) await image.read(allocAligned(w.length), w.offset);
  // The first allocation grows the file ahead (on the pool), by far more than the rest need.
  await applyInWaves(image, writes.slice(0, 1), 1);
  await applyInWaves(image, writes.slice(1), 16);
  t.is(image.engine.info.directWrites, count - 1);
  // Before any flush: the commit the 1024th dirty slice set off has put those mappings on disk.
  let onDisk = 0;
  for (const w of writes) onDisk += (await l2Entry(file, w.offset)) !== 0n ? 1 : 0;
  t.true(onDisk >= 1000, `${onDisk} of ${writes.length} mappings on disk before the flush`);
  await image.close();
  const reads = writes.flatMap((w) => ['-c', `read -q -P ${w.pattern} ${w.offset} ${w.length}`]);
  for (let i = 0; i < reads.length; i += 400) await qemuIo('-f', 'qcow2', '-r', ...reads.slice(i, i + 400), file);
  await assertClean(t, file);
});

/** What a sector may hold after a wave: the values of the operations covering it, or what it held before. */
type Candidates = Set<number>[];

test('concurrent overlapping writes, zero writes and discards on the same clusters: each sector holds one of them', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'overlap.qcow2');
  const size = 1 * MiB;
  const cs = 64 * KiB;
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', file, `${size}`);
  const image = await openQcow2(file, { cache: 'none' });
  const rnd = random(7);
  const sectors = size / SECTOR;
  let model = new Uint8Array(sectors);
  for (let wave = 0; wave < 40; wave++) {
    const candidates: Candidates = Array.from({ length: sectors }, (_, s) => new Set([model[s]]));
    const covered = new Uint8Array(sectors);
    const ops: Promise<void>[] = [];
    for (let i = 0; i < 24; i++) {
      // Everything lands in 4 clusters, so that requests meet.
      const offset = Math.floor((rnd() * 4 * cs) / (4 * KiB)) * 4 * KiB;
      const length = Math.min(4 * KiB * (1 + Math.floor(rnd() * 20)), 4 * cs - offset);
      const roll = rnd();
      const first = offset / SECTOR;
      const end = (offset + length) / SECTOR;
      if (roll < 0.8) {
        const pattern = 1 + wave * 6 + (i % 6);
        for (let s = first; s < end; s++) {
          if (!covered[s]) candidates[s].clear();
          covered[s] = 1;
          candidates[s].add(pattern);
        }
        ops.push(image.write(alignedPattern(length, pattern), offset));
      } else {
        // Zero writes (with and without unmap) and discards read as zeros wherever they change the mapping.
        const kind = roll < 0.87 ? 'zero' : roll < 0.94 ? 'unmap' : 'discard';
        const from = kind === 'discard' ? Math.ceil(offset / cs) * cs : offset;
        const to = kind === 'discard' ? Math.floor((offset + length) / cs) * cs : offset + length;
        for (let s = from / SECTOR; s < to / SECTOR; s++) {
          if (!covered[s]) candidates[s].clear();
          covered[s] = 1;
          candidates[s].add(0);
        }
        if (kind === 'discard') ops.push(image.discard(offset, length));
        else ops.push(image.writeZeroes(offset, length, { unmap: kind === 'unmap' }));
      }
    }
    await Promise.all(ops);
    const seen = allocAligned(size);
    await image.read(seen, 0);
    const next = new Uint8Array(sectors);
    for (let s = 0; s < sectors; s++) {
      const value = seen[s * SECTOR];
      const whole = seen.subarray(s * SECTOR, (s + 1) * SECTOR).every((b) => b === value);
      if (!whole || !candidates[s].has(value)) {
        t.fail(`wave ${wave}: sector ${s} holds ${whole ? value : 'a torn mix'}, expected one of ${[...candidates[s]].join(', ')}`);
        await image.close();
        return;
      }
      next[s] = value;
    }
    model = next;
  }
  t.true(image.engine.info.directWrites > 0);
  await image.close();
  await assertClean(t, file);
  const raw = path.join(dir, 'overlap.raw');
  await qemuImg('convert', '-f', 'qcow2', '-O', 'raw', file, raw);
  const bytes = await readFile(raw);
  for (let s = 0; s < sectors; s++) {
    if (bytes[s * SECTOR] !== model[s]) {
      t.fail(`qemu-img reads sector ${s} as ${bytes[s * SECTOR]}, we read ${model[s]}`);
      return;
    }
  }
  t.pass();
});

test('in-place writes leave clusters shared with a snapshot, and a backing image, to copy-on-write', async (t) => {
  const dir = await tempDir(t);
  const base = path.join(dir, 'base.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', base, '4M');
  await qemuIo('-f', 'qcow2', '-c', 'write -q -P 7 0 4M', base);
  const overlay = path.join(dir, 'overlay.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', overlay);
  const snap = path.join(dir, 'snap.qcow2');
  await copyFile(base, snap);
  await qemuImg('snapshot', '-c', 'before', snap);
  const writes = disjointWrites(5, 64, 4 * MiB, 64 * KiB, 16);
  for (const file of [overlay, snap]) {
    const twin = `${file}.twin`;
    await copyFile(file, twin);
    const image = await openQcow2(file, { cache: 'none', followFileNames: true });
    await applyInWaves(image, writes, 16);
    await image.close();
    await applyQemu(twin, writes);
    await qemuImg('compare', '-f', 'qcow2', '-F', 'qcow2', file, twin);
    await assertClean(t, file);
  }
  // The snapshot still reads as before the writes.
  const before = path.join(dir, 'before.qcow2');
  await qemuImg('convert', '-f', 'qcow2', '-O', 'qcow2', '-l', 'snapshot.name=before', snap, before);
  await qemuIo('-f', 'qcow2', '-r', '-c', 'read -q -P 7 0 4M', before);
  t.pass();
});

test('a resize that grows the L1 table waits for the writes in flight on the io_uring path', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'grow.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', file, '1G');
  const writes = allocatingWrites(256, 2 * MiB, 64 * KiB);
  const twin = path.join(dir, 'twin.qcow2');
  await copyFile(file, twin);
  const image = await openQcow2(file, { cache: 'none' });
  const pending = writes.map((w) => image.write(alignedPattern(w.length, w.pattern), w.offset));
  // 1 GiB needs 2 L1 entries, 8 GiB 16: the L1 table moves while writes are in flight.
  await Promise.all([...pending, image.resize(8 * 1024 * MiB)]);
  await Promise.all(writes.map((w) => image.write(alignedPattern(w.length, 255 - w.pattern), w.offset + 4 * 1024 * MiB)));
  t.true(image.engine.info.directWrites > 0);
  await image.close();
  await qemuImg('resize', '-q', '-f', 'qcow2', twin, '8G');
  await applyQemu(twin, [...writes, ...writes.map((w) => ({ ...w, offset: w.offset + 4 * 1024 * MiB, pattern: 255 - w.pattern }))]);
  await qemuImg('compare', '-f', 'qcow2', '-F', 'qcow2', file, twin);
  await assertClean(t, file);
});
