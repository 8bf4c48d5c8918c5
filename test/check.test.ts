/**
 * `check` against `qemu-img check`: images made with qemu-img/qemu-io, broken on purpose, checked by
 * both on twin copies (plain, JSON, -r leaks, -r all). The output, messages and exit codes must be
 * equal; after a repair both tools' images check the same, and the guest data reads the same.
 */
import { copyFile, mkdir, readdir } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { asQcow2Error } from '../ts/errors.js';
import { CheckOutput, renderCheck } from '../ts/cli/check.js';
import { openQcow2 } from '../ts/qcow2/open.js';
import { RepairMode, check } from '../ts/tools/check.js';
import {
  COPIED,
  OFFSET_MASK,
  bitmapDirectory,
  changeL2Entry,
  hostCluster,
  l1EntryOffset,
  l2Entry,
  readLayout,
  readU64,
  refcountTableEntryOffset,
  setIncompatibleBits,
  setRefcount,
  writeAt,
  writeU64,
} from './helpers/check-images.js';
import { qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';

interface Mode {
  args: string[];
  repair?: RepairMode;
  output: 'human' | 'json';
}

const MODES: Mode[] = [
  { args: [], output: 'human' },
  { args: ['--output=json'], output: 'json' },
  { args: ['-r', 'leaks'], repair: 'leaks', output: 'human' },
  { args: ['-r', 'all'], repair: 'all', output: 'human' },
];

interface Case {
  name: string;
  /** Make the image in `dir` (with any files it names) and return its file name. */
  make(dir: string): Promise<string>;
  /** qemu rewrites persistent bitmaps when it opens an image writable: the repaired files then differ in layout. */
  bitmapsRewritten?: boolean;
  /** The modes compared (all when absent), for images where qemu's repair runs into trouble of its own. */
  compared?: (mode: Mode) => boolean;
}

/** A qcow2 image made by qemu-img create with `options`, then written by qemu-io `commands`. */
async function made(dir: string, name: string, options: string, commands: string[], size = '8M'): Promise<string> {
  const file = path.join(dir, name);
  await qemuImg('create', '-q', '-f', 'qcow2', ...(options ? ['-o', options] : []), file, size);
  if (commands.length) await qemuIo(...commands.flatMap((c) => ['-c', c]), file);
  return name;
}

/** Where each snapshot table entry starts (each padded to 8 bytes). */
async function snapshotEntryOffsets(file: string): Promise<number[]> {
  const count = Number((await readU64(file, 56)) & 0xffffffffn);
  const offsets: number[] = [];
  let entry = Number(await readU64(file, 64));
  for (let i = 0; i < count; i++) {
    offsets.push(entry);
    const sizes = await readU64(file, entry + 8);
    const extra = (await readU64(file, entry + 32)) & 0xffffffffn;
    entry += Math.ceil((40 + Number(extra) + Number((sizes >> 16n) & 0xffffn) + Number(sizes & 0xffffn)) / 8) * 8;
  }
  return offsets;
}

async function writeU32(file: string, offset: number, value: number): Promise<void> {
  const buf = Buffer.alloc(4);
  buf.writeUInt32BE(value);
  await writeAt(file, offset, buf);
}

async function writeU16(file: string, offset: number, value: number): Promise<void> {
  const buf = Buffer.alloc(2);
  buf.writeUInt16BE(value);
  await writeAt(file, offset, buf);
}

/** An image with data at 0-1 MiB and 4 MiB, then `brk` applied to it. */
function broken(name: string, brk: (file: string) => Promise<void>, options = '', extra: string[] = []): Case {
  return {
    name,
    async make(dir) {
      const image = await made(dir, 'img.qcow2', options, ['write -P 1 0 1M', 'write -P 2 4M 64k', ...extra]);
      await brk(path.join(dir, image));
      return image;
    },
  };
}

const FAR = 1n << 40n;

const CASES: Case[] = [
  broken('a clean image', async () => {}),
  broken('a leaked cluster (refcount raised)', async (f) => setRefcount(f, await hostCluster(f, 0), 2)),
  {
    name: 'a leaked free cluster',
    async make(dir) {
      const image = await made(dir, 'img.qcow2', '', ['write -P 1 0 1M']);
      const file = path.join(dir, image);
      const freed = await hostCluster(file, 64 * 1024);
      await qemuIo('-c', 'discard 64k 64k', file);
      await setRefcount(file, freed, 1);
      return image;
    },
  },
  broken('a refcount of 0 under a data cluster (rebuild)', async (f) => setRefcount(f, await hostCluster(f, 0), 0)),
  broken("the header's refcount at 0 (rebuild)", async (f) => setRefcount(f, 0, 0)),
  {
    name: 'a refcount too low under a snapshot-shared cluster',
    async make(dir) {
      const image = await made(dir, 'img.qcow2', '', ['write -P 1 0 1M']);
      const file = path.join(dir, image);
      await qemuImg('snapshot', '-c', 'snap', file);
      await setRefcount(file, await hostCluster(file, 0), 1);
      return image;
    },
  },
  broken('an L2 entry pointing at the L1 table', async (f) => {
    const { l1Offset } = await readLayout(f);
    await changeL2Entry(f, 2 << 20, () => COPIED | BigInt(l1Offset));
  }),
  broken('an L2 entry pointing at a refcount block', async (f) => {
    const block = (await readU64(f, await refcountTableEntryOffset(f, 0))) & OFFSET_MASK;
    await changeL2Entry(f, 2 << 20, () => COPIED | block);
  }),
  broken('an L1 entry pointing at the header', async (f) => writeU64(f, await l1EntryOffset(f, 0), COPIED)),
  broken('an unaligned data cluster entry', async (f) => changeL2Entry(f, 64 * 1024, (e) => e + 0x200n)),
  broken('an unaligned preallocated zero entry', async (f) => {
    const host = (await l2Entry(f, 0)) & OFFSET_MASK;
    await changeL2Entry(f, 2 << 20, () => COPIED | (host + 0x200n) | 1n);
  }),
  broken('a data cluster past the end of the file', async (f) => changeL2Entry(f, 64 * 1024, () => COPIED | FAR)),
  broken('an L2 table past the end of the file', async (f) => writeU64(f, await l1EntryOffset(f, 0), COPIED | FAR)),
  broken('reserved bits in an L1 entry', async (f) => {
    const at = await l1EntryOffset(f, 0);
    await writeU64(f, at, (await readU64(f, at)) | 0x100n);
  }),
  broken('reserved bits in an L2 entry', async (f) => changeL2Entry(f, 0, (e) => e | 0x2n)),
  broken('COPIED cleared in an L2 entry', async (f) => changeL2Entry(f, 0, (e) => e & ~COPIED)),
  broken('COPIED cleared in an L1 entry', async (f) => {
    const at = await l1EntryOffset(f, 0);
    await writeU64(f, at, (await readU64(f, at)) & ~COPIED);
  }),
  {
    name: 'COPIED set on a snapshot-shared cluster',
    async make(dir) {
      const image = await made(dir, 'img.qcow2', '', ['write -P 1 0 1M']);
      const file = path.join(dir, image);
      await qemuImg('snapshot', '-c', 'snap', file);
      await changeL2Entry(file, 0, (e) => e | COPIED);
      return image;
    },
  },
  broken(
    'a compressed descriptor past the end of the file',
    async (f) => changeL2Entry(f, 2 << 20, (e) => (e & ~((1n << 54n) - 1n)) | FAR),
    '',
    ['write -c -P 3 2M 64k'],
  ),
  broken('a compressed descriptor with COPIED set', async (f) => changeL2Entry(f, 2 << 20, (e) => e | COPIED), '', ['write -c -P 3 2M 64k']),
  broken('compressed clusters', async () => {}, '', ['write -c -P 3 2M 256k', 'write -c -P 4 6M 64k']),
  broken('a refcount table entry with reserved bits', async (f) => {
    const at = await refcountTableEntryOffset(f, 0);
    await writeU64(f, at, (await readU64(f, at)) | 0x1n);
  }),
  broken('a refcount block outside the image', async (f) => writeU64(f, await refcountTableEntryOffset(f, 0), 1n << 30n)),
  broken('an unaligned refcount block at an L2 table', async (f) => {
    const l2 = (await readU64(f, await l1EntryOffset(f, 0))) & OFFSET_MASK;
    await writeU64(f, await refcountTableEntryOffset(f, 1), l2 + 0x200n);
  }),
  {
    name: 'an unaligned refcount block in use (4 KiB clusters): a corruption event, fatal with -r',
    async make(dir) {
      const image = await made(dir, 'img.qcow2', 'cluster_size=4k', ['write -P 1 0 9M'], '16M');
      const file = path.join(dir, image);
      const at = await refcountTableEntryOffset(file, 1);
      await writeU64(file, at, (await readU64(file, at)) + 0x200n);
      return image;
    },
  },
  broken('the dirty bit with a leak', async (f) => {
    await setRefcount(f, await hostCluster(f, 0), 3);
    await setIncompatibleBits(f, 1n);
  }),
  broken('the corrupt bit', async (f) => setIncompatibleBits(f, 2n)),
  {
    name: 'internal snapshots',
    async make(dir) {
      const image = await made(dir, 'img.qcow2', '', ['write -P 1 0 1M']);
      const file = path.join(dir, image);
      await qemuImg('snapshot', '-c', 'one', file);
      await qemuIo('-c', 'write -P 2 512k 1M', file);
      await qemuImg('snapshot', '-c', 'two', file);
      await qemuIo('-c', 'write -P 3 0 64k', file);
      return image;
    },
  },
  ...[
    { what: 'an unaligned L1 table offset', at: 0, value: (offset: bigint) => offset + 0x200n, bytes: 8 },
    { what: 'an L1 table past the end of the file', at: 0, value: () => FAR, bytes: 8 },
    { what: 'an L1 table too large', at: 8, value: () => 0x800000n, bytes: 4 },
  ].map(({ what, at, value, bytes }) => ({
    name: `a snapshot with ${what}`,
    async make(dir: string) {
      const image = await made(dir, 'img.qcow2', '', ['write -P 1 0 1M']);
      const file = path.join(dir, image);
      await qemuImg('snapshot', '-c', 'snap', file);
      const entry = Number(await readU64(file, 64));
      const buf = Buffer.alloc(8);
      buf.writeBigUInt64BE(value(await readU64(file, entry + at)));
      await writeAt(file, entry + at, bytes === 8 ? buf : buf.subarray(4));
      return image;
    },
  })),
  ...[
    { what: 'the second snapshot table entry zeroed (incomplete)', brk: (f: string, e: number[]) => writeAt(f, e[1], Buffer.alloc(200)) },
    { what: 'every snapshot table entry zeroed (incomplete)', brk: (f: string, e: number[]) => writeAt(f, e[0], Buffer.alloc(200)) },
    { what: 'a snapshot table entry past the end of the file', brk: (f: string) => writeU32(f, 60, 3) },
    { what: 'a snapshot ID running past the end of the file', brk: (f: string, e: number[]) => writeU16(f, e[1] + 12, 60000) },
    { what: 'too much snapshot extra data', brk: (f: string, e: number[]) => writeU32(f, e[0] + 36, 2000) },
    // qemu -r all drops the overhanging entries, then fails rewriting the table over the old one.
    { what: 'too many snapshots', brk: (f: string) => writeU32(f, 60, 70000), compared: (mode: Mode) => mode.repair !== 'all' },
  ].map(({ what, brk, compared }) => ({
    name: `a snapshot table with ${what}`,
    compared,
    async make(dir: string) {
      const image = await made(dir, 'img.qcow2', '', ['write -P 1 0 128k']);
      const file = path.join(dir, image);
      await qemuImg('snapshot', '-c', 'one', file);
      await qemuImg('snapshot', '-c', 'two', file);
      await brk(file, await snapshotEntryOffsets(file));
      return image;
    },
  })),
  {
    name: 'persistent bitmaps, one in use, one table entry on a free cluster',
    bitmapsRewritten: true,
    async make(dir) {
      const image = await made(dir, 'img.qcow2', '', ['write -P 1 0 1M']);
      const file = path.join(dir, image);
      await qemuImg('bitmap', '--add', file, 'b0');
      await qemuIo('-c', 'write 2M 64k', file);
      await qemuImg('bitmap', '--add', file, 'b1');
      const [b0] = await bitmapDirectory(file);
      await writeAt(file, b0.flagsAt, Buffer.from([0, 0, 0, 3]));
      return image;
    },
  },
  {
    name: 'a bitmap table past the end of the file, beyond 2^53',
    // qemu -r also prints what its rewrite of the bitmaps on closing fails at.
    compared: (mode) => !mode.repair,
    async make(dir) {
      const image = await made(dir, 'img.qcow2', '', []);
      const file = path.join(dir, image);
      await qemuImg('bitmap', '--add', file, 'b0');
      await qemuImg('bitmap', '--add', file, 'b1');
      await qemuIo('-c', 'write -P 1 0 1M', file);
      const [b0] = await bitmapDirectory(file);
      // The directory entry starts with the table offset, 12 bytes before its flags.
      await writeAt(file, b0.flagsAt - 12, Buffer.from([2]));
      return image;
    },
  },
  {
    name: 'a bitmap table entry on a cluster with refcount 0',
    bitmapsRewritten: true,
    async make(dir) {
      const image = await made(dir, 'img.qcow2', '', ['write -P 1 0 1M']);
      const file = path.join(dir, image);
      const freed = await hostCluster(file, 64 * 1024);
      await qemuIo('-c', 'discard 64k 64k', file);
      await qemuImg('bitmap', '--add', file, 'b0');
      await qemuIo('-c', 'write 2M 64k', file);
      const [b0] = await bitmapDirectory(file);
      await writeU64(file, b0.tableOffset, BigInt(freed * (await readLayout(file)).clusterSize));
      return image;
    },
  },
  {
    name: 'bitmaps whose autoclear bit was cleared',
    bitmapsRewritten: true,
    async make(dir) {
      const image = await made(dir, 'img.qcow2', '', ['write -P 1 0 1M']);
      const file = path.join(dir, image);
      await qemuImg('bitmap', '--add', file, 'b0');
      await qemuIo('-c', 'write 2M 64k', file);
      await writeU64(file, 88, 0n);
      return image;
    },
  },
  broken('extended L2 entries', async () => {}, 'extended_l2=on', ['write -P 3 2M 3k', 'write -z 3M 64k', 'write -c -P 5 6M 64k']),
  broken(
    'extended L2: a subcluster both allocated and zero',
    async (f) => {
      const at = (await readLayout(f)).l1Offset;
      const l2 = Number((await readU64(f, at)) & OFFSET_MASK);
      await writeU64(f, l2 + 8, 0x0000000100000001n);
    },
    'extended_l2=on',
  ),
  broken(
    'extended L2: an unallocated entry with allocation bits',
    async (f) => {
      const l2 = Number((await readU64(f, (await readLayout(f)).l1Offset)) & OFFSET_MASK);
      await writeU64(f, l2 + 16 * 40 + 8, 0x3n);
    },
    'extended_l2=on',
  ),
  ...[1, 2, 4, 8, 32, 64].map((bits) =>
    broken(`${bits}-bit refcounts with a leak and a corruption`, async (f) => {
      await setRefcount(f, await hostCluster(f, 0), bits === 1 ? 0 : 2);
      if (bits > 1) await setRefcount(f, await hostCluster(f, 4 << 20), 0);
    }, `refcount_bits=${bits}`),
  ),
  broken('512-byte clusters with a leak', async (f) => setRefcount(f, await hostCluster(f, 0), 2), 'cluster_size=512'),
  broken('2 MiB clusters with a low refcount', async (f) => setRefcount(f, await hostCluster(f, 0), 0), 'cluster_size=2M'),
  broken('a version 2 image with a leak', async (f) => setRefcount(f, await hostCluster(f, 0), 2), 'compat=0.10'),
  {
    name: 'an external data file, COPIED cleared',
    async make(dir) {
      // qemu opens a relative data file name from the working directory: the twins share this one.
      const image = await made(dir, 'img.qcow2', `data_file=${path.join(dir, 'img.data')}`, ['write -P 1 0 1M']);
      await changeL2Entry(path.join(dir, image), 0, (e) => e & ~COPIED);
      return image;
    },
  },
  {
    name: 'an overlay with a leak',
    async make(dir) {
      await made(dir, 'base.qcow2', '', ['write -P 1 0 1M']);
      await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', path.join(dir, 'img.qcow2'));
      await qemuIo('-c', 'write -P 2 64k 64k', path.join(dir, 'img.qcow2'));
      await setRefcount(path.join(dir, 'img.qcow2'), await hostCluster(path.join(dir, 'img.qcow2'), 64 * 1024), 2);
      return 'img.qcow2';
    },
  },
  {
    name: 'an overlay whose backing file is missing',
    async make(dir) {
      await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'gone.qcow2', '-F', 'qcow2', '-u', path.join(dir, 'img.qcow2'), '8M');
      return 'img.qcow2';
    },
  },
  {
    name: 'a raw image',
    async make(dir) {
      await qemuImg('create', '-q', '-f', 'raw', path.join(dir, 'img.raw'), '1M');
      return 'img.raw';
    },
  },
];

/** Our check of `file` rendered as the CLI prints it (an open failure as qemu-img words it). */
async function ours(file: string, mode: Mode): Promise<CheckOutput> {
  try {
    return renderCheck(file, await check(file, { repair: mode.repair }), { output: mode.output, repair: mode.repair });
  } catch (error) {
    return { stdout: '', stderr: `qcow2: Could not open '${file}': ${asQcow2Error(error).message}\n`, code: 1 };
  }
}

/** qemu-img check of `file`, its messages worded as our CLI words them. */
async function theirs(args: string[], file: string): Promise<CheckOutput> {
  const r = await runProgram('qemu-img', ['check', ...args, file]);
  return {
    stdout: r.stdout,
    stderr: r.stderr.replace(/^qemu-img: /gm, 'qcow2: ').replace(/'qemu-img check -r'/g, "'qcow2 check -r'"),
    code: r.code,
  };
}

async function copyDir(from: string, to: string): Promise<void> {
  await mkdir(to, { recursive: true });
  for (const name of await readdir(from)) await copyFile(path.join(from, name), path.join(to, name));
}

/** Cases run a few at a time: each one runs many processes. */
let running = 0;
const waiting: (() => void)[] = [];
async function limited<T>(work: () => Promise<T>): Promise<T> {
  while (running >= 3) await new Promise<void>((resolve) => waiting.push(resolve));
  running++;
  try {
    return await work();
  } finally {
    running--;
    waiting.shift()?.();
  }
}

async function compareMode(t: ExecutionContext, c: Case, source: string, image: string, mode: Mode, root: string): Promise<void> {
  const label = `${c.name} ${mode.args.join(' ')}`;
  const a = path.join(root, `ours${MODES.indexOf(mode)}`);
  const b = path.join(root, `qemu${MODES.indexOf(mode)}`);
  await copyDir(source, a);
  await copyDir(source, b);
  const mine = await ours(path.join(a, image), mode);
  const reference = await theirs(mode.args, path.join(b, image));
  t.is(mine.stdout.replaceAll(a, b), reference.stdout, `stdout: ${label}\n${mine.stderr}`);
  t.is(mine.stderr.replaceAll(a, b), reference.stderr, `stderr: ${label}`);
  t.is(mine.code, reference.code, `exit code: ${label}`);
  if (!mode.repair || reference.code === 63) return;
  if (!c.bitmapsRewritten) {
    const after = await theirs([], path.join(a, image));
    const expected = await theirs([], path.join(b, image));
    t.is(after.stdout + after.stderr.replaceAll(a, b), expected.stdout + expected.stderr, `after repair: ${label}`);
    t.is(after.code, expected.code, `exit code after repair: ${label}`);
  }
  // Guest data that read before the repair reads the same after it.
  const data = await runProgram('qemu-img', ['compare', '-q', path.join(source, image), path.join(a, image)]);
  if (data.code !== 0) {
    const qemuData = await runProgram('qemu-img', ['compare', '-q', path.join(source, image), path.join(b, image)]);
    t.not(qemuData.code, 0, `guest data changed by our repair only: ${label}`);
  }
}

for (const c of CASES) {
  test(`check equals qemu-img check: ${c.name}`, async (t) => {
    await limited(async () => {
      const root = await tempDir(t);
      const source = path.join(root, 'source');
      await mkdir(source);
      const image = await c.make(source);
      for (const mode of MODES.filter(c.compared ?? (() => true))) await compareMode(t, c, source, image, mode, root);
    });
  });
}

test('check without -r leaves the image untouched, even with the dirty and corrupt bits set', async (t) => {
  const dir = await tempDir(t);
  await made(dir, 'img.qcow2', '', ['write -P 1 0 1M']);
  const file = path.join(dir, 'img.qcow2');
  await setRefcount(file, await hostCluster(file, 0), 0);
  await setIncompatibleBits(file, 3n);
  const before = await runProgram('sha256sum', [file]);
  const result = await check(file);
  t.is(result.corruptions, 2);
  t.is((await runProgram('sha256sum', [file])).stdout, before.stdout);
});

test('check -r all rebuilds damaged refcounts, leaves qemu-img check clean and clears the dirty and corrupt bits', async (t) => {
  const dir = await tempDir(t);
  await made(dir, 'img.qcow2', '', ['write -P 1 0 1M', 'write -P 2 5M 128k']);
  const file = path.join(dir, 'img.qcow2');
  await setRefcount(file, await hostCluster(file, 0), 0);
  await setRefcount(file, await hostCluster(file, 5 << 20), 0);
  await setIncompatibleBits(file, 3n);
  const result = await check(file, { repair: 'all' });
  t.true(result.corruptionsFixed > 0);
  t.is(result.corruptions, 0);
  t.is((await runProgram('qemu-img', ['check', file])).code, 0);
  t.is((await readU64(file, 72)) & 3n, 0n);
});

test('the refcount rebuild of a dirty image counts the bitmap clusters: writes after it never land on them', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'lazy.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', file, '16M');
  await qemuIo('-c', 'write -P 1 0 1M', file);
  await qemuImg('bitmap', '--add', file, 'b0');
  await qemuIo('-c', 'write -P 2 2M 64k', file);
  const [b0] = await bitmapDirectory(file);
  const tableCluster = b0.tableOffset;
  const before = await readU64(file, tableCluster);
  // qemu-io's abort leaves the dirty bit set and the refcounts of these writes unwritten.
  await t.throwsAsync(runProgram('qemu-io', ['-c', 'write -P 3 4M 64k', '-c', 'abort', file]), { message: /Command failed/ });
  t.is((await readU64(file, 72)) & 1n, 1n);
  const image = await openQcow2(file);
  try {
    await image.write(Buffer.alloc(4 << 20, 7), 8 << 20);
  } finally {
    await image.close();
  }
  t.is(await readU64(file, tableCluster), before);
  const ours = await check(file);
  const reference = await theirs([], file);
  t.is(renderCheck(file, ours, { output: 'human' }).stdout, reference.stdout);
  t.is(ours.corruptions, 0);
});
