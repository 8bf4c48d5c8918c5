/**
 * Writing qcow2 images: the same seeded sequences of writes, zero writes and discards applied
 * through our API and through qemu-io to twin images, which must then read the same, and ours
 * must pass qemu-img check without errors or leaks.
 */
import { copyFile, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes, Qcow2Error, Qcow2Image, openQcow2 } from '../ts/index.js';
import { createQcow2, Qcow2CreateOptions } from '../ts/qcow2/create.js';
import { patternBytes, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';
import { random } from './helpers/random.js';
import { qemuCreateArgs } from './helpers/create-args.js';

/** One guest operation, as both sides apply it. */
type Op =
  | { kind: 'write'; offset: number; length: number; pattern: number }
  | { kind: 'zero'; offset: number; length: number; unmap: boolean }
  | { kind: 'discard'; offset: number; length: number };

/** `count` operations over a disk of `size` bytes: aligned and unaligned, inside one cluster and across several. */
function randomOps(seed: number, count: number, size: number, clusterSize: number): Op[] {
  const rnd = random(seed);
  const int = (n: number) => Math.floor(rnd() * n);
  const ops: Op[] = [];
  for (let i = 0; i < count; i++) {
    const aligned = rnd() < 0.4;
    const span = rnd() < 0.3 ? clusterSize * (1 + int(3)) : 1 + int(clusterSize);
    let offset = aligned ? int(size / clusterSize) * clusterSize : int(size);
    let length = aligned ? Math.ceil(span / clusterSize) * clusterSize : span;
    // qemu-io takes 512-byte multiples for discard and zero writes of qcow2 images.
    const roll = rnd();
    if (roll < 0.6) {
      length = Math.min(length, size - offset);
      if (length > 0) ops.push({ kind: 'write', offset, length, pattern: 1 + int(254) });
      continue;
    }
    offset -= offset % 512;
    length = Math.min(Math.max(512, length - (length % 512)), size - offset);
    if (roll < 0.85) ops.push({ kind: 'zero', offset, length, unmap: rnd() < 0.5 });
    else ops.push({ kind: 'discard', offset, length });
  }
  return ops;
}

async function applyOurs(image: Qcow2Image, ops: Op[]): Promise<void> {
  for (const op of ops) {
    if (op.kind === 'write') await image.write(Buffer.alloc(op.length, op.pattern), op.offset);
    else if (op.kind === 'zero') await image.writeZeroes(op.offset, op.length, { unmap: op.unmap });
    else await image.discard(op.offset, op.length);
  }
}

/** The operations as qemu-io commands, run in one qemu-io process. */
async function applyQemu(file: string, ops: Op[]): Promise<void> {
  const args: string[] = [];
  for (const op of ops) {
    const cmd =
      op.kind === 'write'
        ? `write -P ${op.pattern} ${op.offset} ${op.length}`
        : op.kind === 'zero'
          ? `write -z${op.unmap ? ' -u' : ''} ${op.offset} ${op.length}`
          : `discard ${op.offset} ${op.length}`;
    args.push('-c', cmd);
  }
  await qemuIo('-f', 'qcow2', ...args, file);
}

/** qemu-img check --output=json: no corruption, no leak, no check error. */
async function assertClean(t: ExecutionContext, file: string): Promise<void> {
  const r = await runProgram('qemu-img', ['check', '--output=json', file]);
  const report = JSON.parse(r.stdout) as { corruptions?: number; leaks?: number; 'check-errors'?: number };
  t.is(report.corruptions ?? 0, 0, `corruptions in ${file}: ${r.stdout}`);
  t.is(report.leaks ?? 0, 0, `leaks in ${file}: ${r.stdout}`);
  t.is(report['check-errors'] ?? 0, 0, `check errors in ${file}: ${r.stdout}`);
}

async function assertSame(t: ExecutionContext, ours: string, theirs: string): Promise<void> {
  const r = await runProgram('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', ours, theirs]);
  t.is(r.code, 0, `qemu-img compare: ${r.stdout}${r.stderr}`);
}

interface Scenario {
  name: string;
  size: number;
  options: Partial<Qcow2CreateOptions>;
  /** A backing file filled with data (qcow2). */
  backing?: boolean;
  /** Start both twins from an image whose data is stored compressed. */
  compressed?: boolean;
  /** Give both twins data and an internal snapshot of it before the sequence. */
  snapshot?: boolean;
  ops: number;
}

const MiB = 1 << 20;
const SCENARIOS: Scenario[] = [
  { name: 'default options', size: 8 * MiB, options: {}, ops: 60 },
  { name: 'over a backing file', size: 8 * MiB, options: {}, backing: true, ops: 60 },
  { name: 'over compressed clusters', size: 8 * MiB, options: {}, compressed: true, ops: 60 },
  { name: 'extended L2 over a backing file', size: 8 * MiB, options: { extendedL2: true }, backing: true, ops: 60 },
  { name: 'version 2 over a backing file', size: 8 * MiB, options: { compat: '0.10' }, backing: true, ops: 60 },
  { name: 'version 2', size: 8 * MiB, options: { compat: '0.10' }, ops: 40 },
  { name: 'refcount_bits=1', size: 8 * MiB, options: { refcountBits: 1 }, ops: 40 },
  { name: 'refcount_bits=64', size: 8 * MiB, options: { refcountBits: 64 }, ops: 40 },
  { name: 'lazy_refcounts', size: 8 * MiB, options: { lazyRefcounts: true }, ops: 40 },
  { name: '512-byte clusters', size: 2 * MiB, options: { clusterSize: 512 }, ops: 60 },
  { name: '2 MiB clusters', size: 16 * MiB, options: { clusterSize: 2 * MiB }, backing: true, ops: 30 },
  { name: 'external data file', size: 8 * MiB, options: { dataFile: 'DATA' }, ops: 40 },
  { name: 'with an internal snapshot (shared L2 tables and clusters)', size: 8 * MiB, options: {}, snapshot: true, ops: 60 },
  { name: 'extended L2 with an internal snapshot', size: 8 * MiB, options: { extendedL2: true }, snapshot: true, ops: 40 },
];

/** A qcow2 image of `size` bytes full of seeded data, for backing files and compressed twins. */
async function dataImage(file: string, size: number, seed: number): Promise<void> {
  const raw = `${file}.raw`;
  const bytes = patternBytes(size, seed);
  // Leave some holes so that zeros in the backing file show through too.
  bytes.fill(0, size / 4, size / 4 + 3 * 65536);
  await writeFile(raw, bytes);
  await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, file);
}

for (const [index, s] of SCENARIOS.entries()) {
  test(`write, zero and discard sequences match qemu-io: ${s.name}`, async (t) => {
    const dir = await tempDir(t);
    const ours = path.join(dir, 'ours.qcow2');
    const theirs = path.join(dir, 'theirs.qcow2');
    const options: Partial<Qcow2CreateOptions> = { ...s.options };
    if (s.backing) {
      await dataImage(path.join(dir, 'base.qcow2'), s.size, 7 + index);
      options.backingFile = 'base.qcow2';
      options.backingFormat = 'qcow2';
    }
    const clusterSize = options.clusterSize ?? 65536;
    if (s.compressed) {
      const source = path.join(dir, 'source.qcow2');
      await dataImage(source, s.size, 11 + index);
      await qemuImg('convert', '-c', '-f', 'qcow2', '-O', 'qcow2', source, theirs);
      await copyFile(theirs, ours);
    } else {
      const theirsOptions = { ...options, dataFile: options.dataFile && path.join(dir, 'theirs.data') };
      const oursOptions = { ...options, dataFile: options.dataFile && path.join(dir, 'ours.data') };
      await qemuImg('create', '-q', '-f', 'qcow2', ...qemuCreateArgs(theirsOptions), theirs, String(s.size));
      await createQcow2(ours, { size: s.size, ...oursOptions });
    }
    if (s.snapshot) {
      for (const file of [ours, theirs]) {
        await qemuIo('-f', 'qcow2', '-c', `write -P 3 0 ${s.size / 2}`, '-c', `write -c -P 4 ${s.size / 2} ${s.size / 4}`, file);
        await qemuImg('snapshot', '-c', 'before', file);
      }
    }
    await assertClean(t, ours);
    const ops = randomOps(1000 + index, s.ops, s.size, clusterSize);
    const image = await openQcow2(ours, { followFileNames: true });
    try {
      await applyOurs(image, ops);
    } finally {
      await image.close();
    }
    await applyQemu(theirs, ops);
    await assertSame(t, ours, theirs);
    await assertClean(t, ours);
    if (s.snapshot) {
      // The snapshot still holds what it held: the shared clusters were copied, not overwritten.
      for (const file of [ours, theirs]) {
        await qemuImg('convert', '-f', 'qcow2', '-O', 'raw', '-l', 'snapshot.name=before', file, `${file}.snap`);
      }
      const r = await runProgram('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', `${ours}.snap`, `${theirs}.snap`]);
      t.is(r.code, 0, `snapshot: ${r.stdout}`);
    }
  });
}

test('compressed writes read back and leave a clean image, zlib and zstd', async (t) => {
  const dir = await tempDir(t);
  for (const compressionType of ['zlib', 'zstd'] as const) {
    const file = path.join(dir, `${compressionType}.qcow2`);
    await createQcow2(file, { size: 4 * MiB, compressionType });
    const image = await openQcow2(file);
    const data = Buffer.alloc(2 * MiB);
    // Compressible halves and an incompressible quarter, which must be stored as it is.
    for (let i = 0; i < data.length; i += 4096) data.fill(i / 4096, i, i + 2048);
    patternBytes(MiB / 2, 3).copy(data, MiB);
    await image.writeCompressed(data, 0);
    // Overwrite part of a compressed cluster: copy-on-write out of the compressed cluster.
    await image.write(Buffer.alloc(1000, 0xee), 70000);
    data.fill(0xee, 70000, 71000);
    await image.close();
    await assertClean(t, file);
    const raw = path.join(dir, `${compressionType}.raw`);
    await qemuImg('convert', '-f', 'qcow2', '-O', 'raw', file, raw);
    const expected = Buffer.alloc(4 * MiB);
    data.copy(expected);
    await writeFile(`${raw}.expected`, expected);
    const r = await runProgram('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', raw, `${raw}.expected`]);
    t.is(r.code, 0, `${compressionType}: ${r.stdout}`);
    const check = JSON.parse(await qemuImg('check', '--output=json', file)) as { 'compressed-clusters'?: number };
    t.true((check['compressed-clusters'] ?? 0) >= 16, `${compressionType}: ${JSON.stringify(check)}`);
  }
});

test('concurrent overlapping writes and reads agree with an in-memory model', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'c.qcow2');
  const size = 4 * MiB;
  await createQcow2(file, { size, clusterSize: 65536 });
  const image = await openQcow2(file);
  const model = Buffer.alloc(size);
  const rnd = random(42);
  try {
    for (let round = 0; round < 8; round++) {
      // Disjoint byte ranges (one per 4 KiB page, inside it), many sharing clusters: each partial
      // write's copy-on-write must keep the others. Overlapping writes in flight at once have no
      // order, so the model could not say which one wins.
      const pages = new Set<number>();
      while (pages.size < 48) pages.add(Math.floor(rnd() * (size / 4096)));
      const pending: Promise<void>[] = [];
      const next = Buffer.from(model);
      for (const page of pages) {
        const start = page * 4096 + Math.floor(rnd() * 2048);
        const bytes = patternBytes(1024 + Math.floor(rnd() * 1024), start + round);
        bytes.copy(next, start);
        pending.push(image.write(bytes, start));
        // A read racing the writes sees, byte by byte, the old or the new content.
        const at = Math.floor(rnd() * (size - 8192));
        const seen = Buffer.alloc(8192);
        pending.push(
          image.read(seen, at).then(() => {
            for (let i = 0; i < seen.length; i++) {
              if (seen[i] !== model[at + i] && seen[i] !== next[at + i]) throw new Error(`read at ${at + i} saw neither old nor new byte`);
            }
          }),
        );
      }
      await Promise.all(pending);
      next.copy(model);
      const all = Buffer.alloc(size);
      await image.read(all, 0);
      t.true(all.equals(model), `round ${round}: image matches the model`);
    }
  } finally {
    await image.close();
  }
  await assertClean(t, file);
});

test('resize grows (with L1 growth) and shrinks like qemu-img resize', async (t) => {
  const dir = await tempDir(t);
  const ours = path.join(dir, 'ours.qcow2');
  const theirs = path.join(dir, 'theirs.qcow2');
  await createQcow2(ours, { size: 4 * MiB, clusterSize: 4096 });
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', theirs, String(4 * MiB));
  const image = await openQcow2(ours);
  try {
    await image.write(Buffer.alloc(8192, 7), 4 * MiB - 8192);
    // 4 KiB clusters map 2 MiB per L2 table: 64 MiB needs a bigger L1 table than 4 MiB had.
    await image.resize(64 * MiB);
    await image.write(Buffer.alloc(4096, 9), 60 * MiB);
    await image.resize(5 * MiB + 1024, { shrink: true });
    const err = await t.throwsAsync<Qcow2Error>(image.write(Buffer.alloc(1), 5 * MiB + 1024));
    t.is(err?.code, ErrorCodes.OUT_OF_BOUNDS);
  } finally {
    await image.close();
  }
  await qemuIo('-f', 'qcow2', '-c', `write -P 7 ${4 * MiB - 8192} 8192`, theirs);
  await qemuImg('resize', '-f', 'qcow2', theirs, String(64 * MiB));
  await qemuIo('-f', 'qcow2', '-c', `write -P 9 ${60 * MiB} 4096`, theirs);
  await qemuImg('resize', '-f', 'qcow2', '--shrink', theirs, String(5 * MiB + 1024));
  await assertSame(t, ours, theirs);
  await assertClean(t, ours);
  const info = JSON.parse(await qemuImg('info', '--output=json', ours)) as { 'virtual-size': number };
  t.is(info['virtual-size'], 5 * MiB + 1024);
});

test('writes to a read-only image and past the end of the disk fail with their codes', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'ro.qcow2');
  await createQcow2(file, { size: MiB });
  const ro = await openQcow2(file, { readOnly: true });
  try {
    t.is((await t.throwsAsync<Qcow2Error>(ro.write(Buffer.alloc(512), 0)))?.code, ErrorCodes.READ_ONLY);
    t.is((await t.throwsAsync<Qcow2Error>(ro.writeZeroes(0, 512)))?.code, ErrorCodes.READ_ONLY);
    t.is((await t.throwsAsync<Qcow2Error>(ro.discard(0, 512)))?.code, ErrorCodes.READ_ONLY);
  } finally {
    await ro.close();
  }
  const rw = await openQcow2(file);
  try {
    t.is((await t.throwsAsync<Qcow2Error>(rw.write(Buffer.alloc(512), MiB - 256)))?.code, ErrorCodes.OUT_OF_BOUNDS);
    t.is((await t.throwsAsync<Qcow2Error>(rw.writeZeroes(MiB, 1)))?.code, ErrorCodes.OUT_OF_BOUNDS);
  } finally {
    await rw.close();
  }
});

test('a writable open clears unknown autoclear bits', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.qcow2');
  await createQcow2(file, { size: MiB });
  await qemuIo('-f', 'qcow2', '-c', 'write -P 1 0 4096', file);
  const { open: openFile } = await import('node:fs/promises');
  const handle = await openFile(file, 'r+');
  const field = Buffer.alloc(8);
  field.writeBigUInt64BE(0x8000000000000004n);
  await handle.write(field, 0, 8, 88);
  await handle.close();
  const image = await openQcow2(file);
  await image.close();
  const { readFile } = await import('node:fs/promises');
  t.is((await readFile(file)).readBigUInt64BE(88), 0n);
});

test('a dirty image (lazy refcounts, no clean close) opens read-only as it is, and writable with rebuilt refcounts', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'lazy.qcow2');
  await createQcow2(file, { size: 16 * MiB, lazyRefcounts: true });
  await qemuIo('-f', 'qcow2', '-c', 'write -P 1 0 1M', '-c', 'write -c -P 2 2M 128k', file);
  await qemuImg('snapshot', '-c', 'kept', file);
  // qemu-io's abort leaves the dirty bit set and the refcounts of these writes unwritten.
  const aborted = runProgram('qemu-io', ['-f', 'qcow2', '-c', 'write -P 3 64k 64k', '-c', 'write -P 4 8M 64k', '-c', 'abort', file]);
  await t.throwsAsync(aborted, { message: /Command failed/ });
  const info = JSON.parse(await qemuImg('info', '--output=json', file)) as { 'dirty-flag': boolean };
  t.true(info['dirty-flag']);
  const ro = await openQcow2(file, { readOnly: true });
  const seen = Buffer.alloc(65536);
  await ro.read(seen, 8 * MiB);
  t.true(seen.equals(Buffer.alloc(65536, 4)));
  await ro.close();
  const rw = await openQcow2(file);
  try {
    await rw.write(Buffer.alloc(4096, 9), 5 * MiB);
  } finally {
    await rw.close();
  }
  await assertClean(t, file);
  const after = JSON.parse(await qemuImg('info', '--output=json', file)) as { 'dirty-flag': boolean };
  t.false(after['dirty-flag']);
  await qemuIo('-f', 'qcow2', '-c', 'read -P 3 64k 64k', '-c', 'read -P 4 8M 64k', '-c', 'read -P 9 5M 4k', '-c', 'read -P 2 2M 128k', file);
});

test('metadata corruption met by a write marks the image corrupt and stops writes', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'bad.qcow2');
  await createQcow2(file, { size: MiB });
  await qemuIo('-f', 'qcow2', '-c', 'write -P 1 0 64k', file);
  // The L2 table is the cluster after the L1 table (cluster 4); give its first entry reserved bits.
  const { open: openFile, readFile } = await import('node:fs/promises');
  const handle = await openFile(file, 'r+');
  const entry = Buffer.alloc(8);
  await handle.read(entry, 0, 8, 4 * 65536);
  entry[7] |= 0x02;
  await handle.write(entry, 0, 8, 4 * 65536);
  await handle.close();
  const image = await openQcow2(file);
  try {
    t.is((await t.throwsAsync<Qcow2Error>(image.write(Buffer.alloc(512), 0)))?.code, ErrorCodes.CORRUPT);
    // Writes elsewhere are refused too once the image is known corrupt.
    t.is((await t.throwsAsync<Qcow2Error>(image.write(Buffer.alloc(512), 512 * 1024)))?.code, ErrorCodes.CORRUPT);
  } finally {
    await image.close();
  }
  t.is((await readFile(file)).readBigUInt64BE(72) & 2n, 2n);
  await t.throwsAsync(openQcow2(file), { code: ErrorCodes.CORRUPT });
});

test('a refcount table that grows twice before a commit leaks nothing (16 MiB in one write, 512-byte clusters)', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'grow.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=512', file, '64M');
  const image = await openQcow2(file);
  const data = patternBytes(16 << 20, 77);
  await image.write(data, 0);
  await image.close();
  await assertClean(t, file);
  const raw = path.join(dir, 'grow.raw');
  await qemuImg('convert', '-O', 'raw', file, raw);
  const { readFile } = await import('node:fs/promises');
  t.deepEqual((await readFile(raw)).subarray(0, 16 << 20), data);
});
