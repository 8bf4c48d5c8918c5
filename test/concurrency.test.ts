/**
 * The concurrency proof: many reads, writes (some compressed), zero writes and discards in flight
 * at once on overlapping ranges of an overlay over a backing chain, checked sector by sector against
 * a model of what each sector may hold (no torn reads, no lost writes), and at every flush point the
 * whole disk; at the end qemu-img check finds nothing and qemu-img reads what we read last.
 *
 * What the model takes zero writes and discards to mean (and checks against qemu-io below): a zero
 * write reads as zeros over its whole range, with or without unmap, on every version. A discard
 * drops only the whole clusters inside its range (the last cluster may end at the disk end); they
 * read as zeros, backing file or not, except on version 2 over a backing file, which has no zero
 * flag: there the discard changes nothing.
 */
import { copyFile, readFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { Image, Qcow2Image, open } from '../ts/index.js';
import { DiskSpec, makeDisk } from './helpers/concurrency-images.js';
import { DiskGeometry, Op, SECTOR, changedSectors } from './helpers/concurrency-model.js';
import { random } from './helpers/random.js';
import { Fault, FakeDisk } from './helpers/concurrency-fake.js';
import { ConcurrencyRun, OpMix, OpSource, ProofFailure } from './helpers/concurrency-run.js';
import { qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Replaces every variant's seed, to reproduce a failure or to search with new ones. */
const SEED_OVERRIDE = process.env.QCOW2_CONCURRENCY_SEED ? Number(process.env.QCOW2_CONCURRENCY_SEED) : undefined;

/** Operations per variant. */
const OPERATIONS = Number(process.env.QCOW2_CONCURRENCY_OPS ?? 3000);

/** Replaces the mix of operations (JSON weights per kind, as OpMix), to reproduce a failure or to aim at one kind. */
const MIX_OVERRIDE = process.env.QCOW2_CONCURRENCY_MIX ? (JSON.parse(process.env.QCOW2_CONCURRENCY_MIX) as OpMix) : undefined;

/** One disk the proof runs on, with the seed of its operations. */
interface Variant {
  name: string;
  spec: DiskSpec;
  seed: number;
  /** Bytes per model sector, when not 512: smaller ones make requests that are not sector-aligned. */
  sectorSize?: number;
}

/** Cluster sizes 512 B to 64 KiB, extended L2, refcount widths 1 and 16, both versions, raw and qcow2 backing, a chain of three. */
const VARIANTS: Variant[] = [
  {
    name: '64 KiB clusters over a qcow2 base',
    spec: { size: 4 * MiB, clusterSize: 64 * KiB, compat: '1.1', base: 'qcow2' },
    seed: 101,
  },
  {
    name: '4 KiB clusters, refcount_bits=1, over a qcow2 base',
    spec: { size: MiB, clusterSize: 4 * KiB, compat: '1.1', refcountBits: 1, base: 'qcow2' },
    seed: 202,
  },
  {
    name: '512-byte clusters, refcount_bits=16, over a raw base',
    spec: { size: 256 * KiB, clusterSize: 512, compat: '1.1', refcountBits: 16, base: 'raw' },
    seed: 303,
  },
  {
    name: 'extended L2, 64 KiB clusters, over a qcow2 base',
    spec: { size: 4 * MiB, clusterSize: 64 * KiB, compat: '1.1', extendedL2: true, base: 'qcow2' },
    seed: 404,
  },
  {
    name: 'extended L2, 16 KiB clusters, over a raw base under a qcow2 image, size not a whole number of clusters',
    spec: { size: MiB + 3 * SECTOR, clusterSize: 16 * KiB, compat: '1.1', extendedL2: true, base: 'raw-under-qcow2' },
    seed: 505,
  },
  {
    name: 'compat 0.10, 64 KiB clusters, over a qcow2 base, size not a whole number of clusters',
    spec: { size: 2 * MiB + 5 * SECTOR, clusterSize: 64 * KiB, compat: '0.10', base: 'qcow2' },
    seed: 606,
  },
  {
    name: 'compat 0.10, 4 KiB clusters, over a raw base',
    spec: { size: MiB, clusterSize: 4 * KiB, compat: '0.10', base: 'raw' },
    seed: 707,
  },
  {
    name: 'compat 0.10, 4 KiB clusters, no backing file',
    spec: { size: MiB, clusterSize: 4 * KiB, compat: '0.10', base: 'none' },
    seed: 808,
  },
  {
    name: 'requests not sector-aligned (64-byte units), 4 KiB clusters, over a qcow2 base',
    spec: { size: 512 * KiB, clusterSize: 4 * KiB, compat: '1.1', base: 'qcow2' },
    seed: 909,
    sectorSize: 64,
  },
  {
    name: 'requests not sector-aligned (64-byte units), extended L2, 32 KiB clusters, over a raw base',
    spec: { size: MiB, clusterSize: 32 * KiB, compat: '1.1', extendedL2: true, base: 'raw' },
    seed: 1010,
    sectorSize: 64,
  },
];

/** What the model needs to know of a disk. */
function geometryOf(spec: DiskSpec, sectorSize = SECTOR): DiskGeometry {
  const version = spec.compat === '0.10' ? 2 : 3;
  return { sectorSize, size: spec.size, clusterSize: spec.clusterSize, version, hasBacking: spec.base !== 'none' };
}

/** The disk as qemu-img reads it. */
async function qemuView(file: string): Promise<Buffer> {
  const raw = `${file}.view.raw`;
  await qemuImg('convert', '-f', 'qcow2', '-O', 'raw', file, raw);
  return readFile(raw);
}

/** qemu-img check --output=json finds no corruption, leak or check error. */
async function assertClean(t: ExecutionContext, file: string, context: string): Promise<void> {
  const r = await runProgram('qemu-img', ['check', '--output=json', file]);
  const report = JSON.parse(r.stdout) as { corruptions?: number; leaks?: number; 'check-errors'?: number };
  const clean = r.code === 0 && !report.corruptions && !report.leaks && !report['check-errors'];
  t.true(clean, `${context}: qemu-img check exited ${r.code}: ${r.stdout}${r.stderr}`);
}

/** The first sector where two disks differ, or -1. */
function firstDifference(a: Buffer, b: Buffer): number {
  for (let s = 0; s * SECTOR < Math.max(a.length, b.length); s++) {
    if (!a.subarray(s * SECTOR, (s + 1) * SECTOR).equals(b.subarray(s * SECTOR, (s + 1) * SECTOR))) return s;
  }
  return -1;
}

/**
 * A proof failure with what qemu-img check says of the closed image, and what qemu-img reads at the
 * failure's sector: is the damage on disk, or only in our reads?
 */
async function withQemuView(error: unknown, image: Image, file: string, run: ConcurrencyRun): Promise<unknown> {
  if (!(error instanceof ProofFailure)) return error;
  const lines = [error.message];
  try {
    await image.close();
    const check = await runProgram('qemu-img', ['check', file]);
    const problems = `${check.stdout}\n${check.stderr}`.split('\n').filter((line) => /ERROR|Leaked|errors were found/.test(line));
    lines.push(`qemu-img check of the closed image exits ${check.code}: ${problems.slice(0, 6).join('; ') || 'no errors'}`);
    if (error.sector !== undefined) {
      const unit = run.geometry.sectorSize;
      const seen = (await qemuView(file)).subarray(error.sector * unit, (error.sector + 1) * unit);
      lines.push(`qemu-img reads the closed image's sector as ${run.model.describe(error.sector, seen)}`);
    }
  } catch (qemuError) {
    lines.push(`(qemu-img could not look at the closed image: ${String(qemuError)})`);
  }
  return new ProofFailure(lines.join('\n'), error.sector);
}

for (const v of VARIANTS) {
  test(`concurrent overlapping operations agree with the sector model: ${v.name}`, async (t) => {
    const seed = SEED_OVERRIDE ?? v.seed;
    const context = `${v.name}, seed ${seed}`;
    const dir = await tempDir(t);
    const file = await makeDisk(dir, v.spec);
    const initial = await qemuView(file);
    const depth = 32 + Math.floor(random(seed ^ 0x27d4eb2f)() * 33);
    const image = await open(file, { followFileNames: true });
    t.true(image instanceof Qcow2Image, 'a qcow2 image');
    const plan = { seed, operations: OPERATIONS, depth, mix: MIX_OVERRIDE };
    const run = new ConcurrencyRun(image as Qcow2Image, geometryOf(v.spec, v.sectorSize), plan, initial);
    let last: Buffer;
    try {
      last = await run.run();
    } catch (error) {
      throw await withQemuView(error, image, file, run);
    } finally {
      await image.close();
    }
    await assertClean(t, file, context);
    const final = await qemuView(file);
    const differs = firstDifference(final, last);
    t.is(differs, -1, `${context}: qemu-img reads sector ${differs} otherwise than our last read of the disk`);
    const s = run.stats;
    const busy = s.racingReads > 0 && s.maxInflight >= 32;
    t.true(busy, `${context}: reads raced writes ${s.racingReads} times, ${s.maxInflight} in flight at most`);
    t.log(`seed ${seed}, depth ${depth}: ${JSON.stringify(s.byKind)}, ${s.epochs} flush points, ${s.racingReads} racing reads`);
  });
}

test('the proof passes a correct in-memory disk and catches torn sectors, lost writes and ignored discards', async (t) => {
  const geometry: DiskGeometry = { sectorSize: SECTOR, size: 256 * KiB, clusterSize: 4 * KiB, version: 3, hasBacking: false };
  const initial = Buffer.alloc(geometry.size, 0x3c);
  const plan = { seed: 77, operations: 1500, depth: 48 };
  const correct = new ConcurrencyRun(new FakeDisk(geometry, 'none', 1, initial), geometry, plan, initial);
  await t.notThrowsAsync(correct.run(), 'a correct disk passes');
  t.true(correct.stats.racingReads > 0);
  const expected: Record<Exclude<Fault, 'none'>, RegExp> = {
    'torn-write': /\(torn\)/,
    'lost-write': /holds the settled content|holds write #\d+; allowed/,
    'ignored-discard': /allowed: discard/,
    'torn-read': /\(torn\)/,
  };
  for (const [fault, message] of Object.entries(expected)) {
    const run = new ConcurrencyRun(new FakeDisk(geometry, fault as Fault, 1, initial), geometry, plan, initial);
    const error = await t.throwsAsync(run.run(), { instanceOf: ProofFailure }, `${fault} is caught`);
    t.regex(error?.message ?? '', message, fault);
    t.regex(error?.message ?? '', /seed 77/, `${fault}: the report names the seed`);
  }
});

/** One operation of the semantics check as a qemu-io command; writes fill a byte derived from their id. */
function qemuCommand(op: Op): string {
  const at = op.sector * SECTOR;
  const length = op.count * SECTOR;
  if (op.kind === 'write') return `write -q -P ${op.id & 0xff} ${at} ${length}`;
  if (op.kind === 'zero') return `write -q -z${op.unmap ? ' -u' : ''} ${at} ${length}`;
  return `discard -q ${at} ${length}`;
}

async function applyOurs(image: Image, op: Op): Promise<void> {
  const at = op.sector * SECTOR;
  const length = op.count * SECTOR;
  if (op.kind === 'write') await image.write(Buffer.alloc(length, op.id & 0xff), at);
  else if (op.kind === 'zero') await image.writeZeroes(at, length, { unmap: op.unmap });
  else await image.discard(at, length);
}

/** What the model says the disk holds after `ops`, one after the other, from `disk`. */
function modelAfter(disk: Buffer, ops: Op[], g: DiskGeometry): Buffer {
  const out = Buffer.from(disk);
  for (const op of ops) {
    const range = changedSectors(op, g);
    if (range) out.fill(op.kind === 'write' ? op.id & 0xff : 0, range.first * SECTOR, range.end * SECTOR);
  }
  return out;
}

const SEMANTICS: { name: string; spec: DiskSpec }[] = [
  { name: 'version 3 over a qcow2 base', spec: { size: MiB, clusterSize: 4 * KiB, compat: '1.1', base: 'qcow2' } },
  { name: 'version 3 without backing', spec: { size: MiB, clusterSize: 4 * KiB, compat: '1.1', base: 'none' } },
  {
    name: 'extended L2 over a raw base',
    spec: { size: MiB + SECTOR, clusterSize: 16 * KiB, compat: '1.1', extendedL2: true, base: 'raw' },
  },
  { name: 'version 2 over a qcow2 base', spec: { size: MiB + 3 * SECTOR, clusterSize: 4 * KiB, compat: '0.10', base: 'qcow2' } },
  { name: 'version 2 without backing', spec: { size: MiB, clusterSize: 4 * KiB, compat: '0.10', base: 'none' } },
];

for (const [index, s] of SEMANTICS.entries()) {
  test(`the model's zero writes and discards mean what qemu-io's do: ${s.name}`, async (t) => {
    const dir = await tempDir(t);
    const g = geometryOf(s.spec);
    const ours = await makeDisk(dir, s.spec);
    // A copy in the same folder: its relative backing name finds the same chain, which neither writes.
    const theirs = path.join(dir, 'twin.qcow2');
    await copyFile(ours, theirs);
    const initial = await qemuView(ours);
    t.true(initial.equals(await qemuView(theirs)), 'the twins start equal');
    const source = new OpSource(9000 + index, g, { read: 0, write: 40, compressed: 0, zero: 30, discard: 30, flush: 0 });
    const ops = source.epoch(120).filter((op) => op.kind !== 'read' && op.kind !== 'flush');
    // Discards at the very end of the disk, which may end inside a cluster.
    ops.push({ id: 9998, kind: 'discard', sector: g.size / SECTOR - 1, count: 1 });
    ops.push({ id: 9999, kind: 'discard', sector: (g.size - g.clusterSize) / SECTOR - 2, count: g.clusterSize / SECTOR + 2 });
    const image = await open(ours, { followFileNames: true });
    try {
      for (const op of ops) await applyOurs(image, op);
    } finally {
      await image.close();
    }
    await qemuIo('-f', 'qcow2', ...ops.flatMap((op) => ['-c', qemuCommand(op)]), theirs);
    const expected = modelAfter(initial, ops, g);
    const qemuSector = firstDifference(await qemuView(theirs), expected);
    t.is(qemuSector, -1, `qemu-io and the model differ at sector ${qemuSector}`);
    const ourSector = firstDifference(await qemuView(ours), expected);
    t.is(ourSector, -1, `our library and the model differ at sector ${ourSector}`);
    await assertClean(t, ours, s.name);
  });
}
