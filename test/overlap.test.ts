/**
 * Overlap protection: an image whose L2 entry (or refcounts) would send a write onto metadata —
 * header, L1 and L2 tables, refcount table and blocks, snapshot table and snapshot L1 tables — is
 * marked corrupt instead, as QEMU does, and the metadata stays as it was.
 */
import { copyFile, open as openFile, readFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes, Qcow2Error, openQcow2, readHeader } from '../ts/index.js';
import { openMetadataFile } from '../ts/qcow2/metadata-file.js';
import { readSnapshots } from '../ts/qcow2/snapshots.js';
import { qcow2Cli, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';

const CLUSTER = 65536;
const COPIED = 1n << 63n;
const OFFSET_MASK = 0x00fffffffffffe00n;
/** The guest cluster whose L2 entry the tests point at a structure. */
const VICTIM = CLUSTER;

/** Where the structures of a test image lie. */
interface Layout {
  header: number;
  l1: number;
  l2: number;
  refcountTable: number;
  refcountBlock: number;
  snapshotTable?: number;
  inactiveL1?: number;
}

async function readU64(file: string, offset: number): Promise<bigint> {
  const bytes = (await readFile(file)).subarray(offset, offset + 8);
  return bytes.readBigUInt64BE(0);
}

async function poke(file: string, offset: number, bytes: Buffer): Promise<void> {
  const handle = await openFile(file, 'r+');
  try {
    await handle.write(bytes, 0, bytes.length, offset);
  } finally {
    await handle.close();
  }
}

async function layoutOf(file: string): Promise<Layout> {
  const { header } = await readHeader(file);
  const layout: Layout = {
    header: 0,
    l1: header.l1TableOffset,
    l2: Number((await readU64(file, header.l1TableOffset)) & OFFSET_MASK),
    refcountTable: header.refcountTableOffset,
    refcountBlock: Number((await readU64(file, header.refcountTableOffset)) & OFFSET_MASK),
  };
  if (header.nbSnapshots > 0) {
    const metadata = await openMetadataFile(file);
    try {
      const snapshots = await readSnapshots(metadata, header);
      layout.snapshotTable = header.snapshotsOffset;
      layout.inactiveL1 = snapshots.entries[0]!.l1TableOffset;
    } finally {
      await metadata.handle.close();
    }
  }
  return layout;
}

/** A 4 MiB image with its first cluster written; with a snapshot, the active L2 table is the image's own again. */
async function baseImage(t: ExecutionContext, snapshot: boolean): Promise<string> {
  const file = path.join(await tempDir(t), 'img.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', file, '4M');
  await qemuIo('-c', 'write -P 1 0 64k', file);
  if (snapshot) {
    await qemuImg('snapshot', '-c', 's1', file);
    await qemuIo('-c', 'write -P 1 0 64k', file);
  }
  return file;
}

/** How a test image is made to write onto the structure it names. */
interface Scenario {
  name: string;
  snapshot: boolean;
  target: (l: Layout) => number;
  /** Break the image so that a write of the victim cluster lands on `target`. */
  breakImage: (file: string, l: Layout) => Promise<void>;
}

/** The victim's L2 entry maps it, owned (COPIED), onto the structure: the write goes there in place. */
function mappedOnto(name: string, target: (l: Layout) => number, snapshot = false): Scenario {
  return {
    name,
    snapshot,
    target,
    breakImage: async (file, l) => {
      const entry = Buffer.alloc(8);
      entry.writeBigUInt64BE(BigInt(target(l)) | COPIED);
      await poke(file, l.l2 + 8 * (VICTIM / CLUSTER), entry);
    },
  };
}

const SCENARIOS: Scenario[] = [
  mappedOnto('active L1 table', (l) => l.l1),
  mappedOnto('active L2 table', (l) => l.l2),
  mappedOnto('refcount table', (l) => l.refcountTable),
  mappedOnto('refcount block', (l) => l.refcountBlock),
  mappedOnto('snapshot table', (l) => l.snapshotTable!, true),
  mappedOnto('inactive L1 table', (l) => l.inactiveL1!, true),
  {
    // An L2 entry cannot point at offset 0; a refcount of 0 for the header lets the allocator hand it out.
    name: 'qcow2_header',
    snapshot: false,
    target: (l) => l.header,
    breakImage: async (file, l) => poke(file, l.refcountBlock, Buffer.alloc(2)),
  },
];

/** The structure's cluster, with the corrupt bit the header is expected to gain set already. */
async function structureBytes(file: string, offset: number, expectCorruptBit: boolean): Promise<Buffer> {
  const bytes = Buffer.from((await readFile(file)).subarray(offset, offset + CLUSTER));
  if (expectCorruptBit && offset === 0) bytes[79]! |= 2;
  return bytes;
}

async function markedCorrupt(file: string): Promise<boolean> {
  const info = JSON.parse(await qemuImg('info', '--output=json', file)) as { 'format-specific': { data: { corrupt: boolean } } };
  return info['format-specific'].data.corrupt;
}

/** Every write of a broken image fails with ERR_QCOW2_CORRUPT; reads go on. */
async function writeThroughLibrary(t: ExecutionContext, file: string, s: Scenario, target: number): Promise<void> {
  const image = await openQcow2(file);
  try {
    const error = await t.throwsAsync<Qcow2Error>(image.write(Buffer.alloc(4096, 2), VICTIM), { instanceOf: Qcow2Error });
    t.is(error?.code, ErrorCodes.CORRUPT);
    t.true(error!.message.includes(`overlaps with ${s.name}`), error!.message);
    t.true(error!.message.includes(`host offset ${target}`), error!.message);
    // Even a write that would land on its own data cluster is refused now.
    const later = await t.throwsAsync<Qcow2Error>(image.write(Buffer.alloc(4096, 3), 0), { instanceOf: Qcow2Error });
    t.is(later?.code, ErrorCodes.CORRUPT);
    const back = Buffer.alloc(4096);
    await image.read(back, 0);
    t.deepEqual(back, Buffer.alloc(4096, 1));
  } finally {
    await image.close();
  }
}

for (const s of SCENARIOS) {
  test(`a write onto the ${s.name} is refused and marks the image corrupt`, async (t) => {
    const file = await baseImage(t, s.snapshot);
    const layout = await layoutOf(file);
    const target = s.target(layout);
    await s.breakImage(file, layout);
    const before = await structureBytes(file, target, true);
    await writeThroughLibrary(t, file, s, target);
    t.deepEqual(await structureBytes(file, target, false), before);
    t.true(await markedCorrupt(file));
    const reopened = await t.throwsAsync<Qcow2Error>(openQcow2(file), { instanceOf: Qcow2Error });
    t.is(reopened?.code, ErrorCodes.CORRUPT);
    const readOnly = await openQcow2(file, { readOnly: true });
    try {
      const back = Buffer.alloc(4096);
      await readOnly.read(back, 0);
      t.deepEqual(back, Buffer.alloc(4096, 1));
    } finally {
      await readOnly.close();
    }
  });

  test(`qcow2 io refuses a write onto the ${s.name} as qemu-io does`, async (t) => {
    const ours = await baseImage(t, s.snapshot);
    const layout = await layoutOf(ours);
    const target = s.target(layout);
    await s.breakImage(ours, layout);
    const theirs = path.join(path.dirname(ours), 'twin.qcow2');
    await copyFile(ours, theirs);
    const before = await structureBytes(ours, target, true);
    const write = `write -P 2 ${VICTIM} 4k`;
    const [a, b] = [await qcow2Cli('io', '-c', write, ours), await runProgram('qemu-io', ['-c', write, theirs])];
    t.is(a.stdout, b.stdout);
    t.is(a.stderr, b.stderr);
    t.is(a.stdout, 'write failed: Input/output error\n');
    t.is(a.code, b.code);
    t.deepEqual(await structureBytes(ours, target, false), before);
    t.true(await markedCorrupt(ours));
    t.true(await markedCorrupt(theirs));
    // Writable opens are refused from now on; read-only ones read.
    const again = await qcow2Cli('io', '-c', 'write -P 3 0 4k', ours);
    t.is(again.code, (await runProgram('qemu-io', ['-c', 'write -P 3 0 4k', theirs])).code);
    t.not(again.code, 0);
    const read = await qcow2Cli('io', '-r', '-c', 'read -P 1 0 4k', ours);
    t.is(read.code, 0);
    t.regex(read.stdout, /^read 4096\/4096 bytes at offset 0\n/);
  });
}
