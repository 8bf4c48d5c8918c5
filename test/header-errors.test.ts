/** Every header validation error, each from a qemu-img image with bytes patched. */
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes } from '../ts/errors.js';
import { encodeExtensionArea, ExtensionType, HeaderExtension } from '../ts/qcow2/extensions.js';
import { parseHeader, readHeader, readHeaderFrom, serializeHeader } from '../ts/qcow2/header.js';
import { openMetadataFile } from '../ts/qcow2/metadata-file.js';
import { readSnapshots } from '../ts/qcow2/snapshots.js';
import { readBitmaps } from '../ts/qcow2/bitmaps.js';
import { TEST_ROOT, qemuImg } from './helpers/qemu.js';

/** Images every case starts from: whole files, read once. */
interface Bases {
  dir: string;
  /** compat 1.1, 64 KiB clusters, 1 GiB: header_length 112, feature table at 112..504, end marker at 504. */
  v3: Buffer;
  /** 512-byte clusters, 1 MiB. */
  small: Buffer;
  /** compat 0.10, 100 MiB. */
  v2: Buffer;
  /** Two bitmaps. */
  bitmaps: Buffer;
  /** Two snapshots. */
  snapshots: Buffer;
}

let bases: Bases;

test.after.always(() => rm(bases.dir, { recursive: true, force: true }));

test.before(async () => {
  const dir = await mkdtemp(path.join(TEST_ROOT, 'qcow2-header-errors-'));
  const make = async (name: string, size: string, ...options: string[]) => {
    const file = path.join(dir, name);
    await qemuImg('create', '-f', 'qcow2', ...options, file, size);
    return file;
  };
  const bitmaps = await make('bitmaps.qcow2', '100M');
  await qemuImg('bitmap', '--add', bitmaps, 'one');
  await qemuImg('bitmap', '--add', bitmaps, 'two');
  const snapshots = await make('snapshots.qcow2', '16M');
  await qemuImg('snapshot', '-c', 'first', snapshots);
  await qemuImg('snapshot', '-c', 'second', snapshots);
  bases = {
    dir,
    v3: await readFile(await make('v3.qcow2', '1G')),
    small: await readFile(await make('small.qcow2', '1M', '-o', 'cluster_size=512')),
    v2: await readFile(await make('v2.qcow2', '100M', '-o', 'compat=0.10')),
    bitmaps: await readFile(bitmaps),
    snapshots: await readFile(snapshots),
  };
});

/** A copy of `base` changed by `edit`. */
function patched(base: Buffer, edit: (b: Buffer) => void): Buffer {
  const copy = Buffer.from(base);
  edit(copy);
  return copy;
}

/** Replace the extension area (from header_length) of a copy of `base` with `extensions` and an end marker. */
function withExtensions(base: Buffer, extensions: HeaderExtension[], edit: (b: Buffer) => void = () => {}): Buffer {
  return patched(base, (b) => {
    const start = b.readUInt32BE(100);
    const clusterSize = 2 ** b.readUInt32BE(20);
    b.fill(0, start, clusterSize);
    encodeExtensionArea(extensions).copy(b, start);
    edit(b);
  });
}

function expectInvalid(t: ExecutionContext, buf: Buffer, code: string, message: RegExp | string): void {
  const error = t.throws(() => parseHeader(buf, buf.length), { code });
  if (typeof message === 'string') t.is(error?.message, message);
  else t.regex(error?.message ?? '', message);
}

/** The fixed-field checks: [title, base, edit, code, message]. */
const FIXED_CASES: [string, Exclude<keyof Bases, 'dir'>, (b: Buffer) => void, string, RegExp | string][] = [
  ['wrong magic', 'v3', (b) => b.writeUInt32BE(0x514649fc, 0), ErrorCodes.WRONG_FORMAT, 'Image is not in qcow2 format'],
  ['version 1', 'v3', (b) => b.writeUInt32BE(1, 4), ErrorCodes.UNSUPPORTED_VERSION, 'Unsupported qcow2 version 1 (only 2 and 3 are supported)'],
  ['version 4', 'v3', (b) => b.writeUInt32BE(4, 4), ErrorCodes.UNSUPPORTED_VERSION, /version 4/],
  ['cluster_bits 8', 'v3', (b) => b.writeUInt32BE(8, 20), ErrorCodes.INVALID_HEADER, 'cluster_bits 8 is outside 9..21'],
  ['cluster_bits 22', 'v3', (b) => b.writeUInt32BE(22, 20), ErrorCodes.INVALID_HEADER, 'cluster_bits 22 is outside 9..21'],
  ['header_length 96', 'v3', (b) => b.writeUInt32BE(96, 100), ErrorCodes.INVALID_HEADER, 'header_length 96 is below the minimum 104'],
  ['header_length 108', 'v3', (b) => b.writeUInt32BE(108, 100), ErrorCodes.INVALID_HEADER, 'header_length 108 is not a multiple of 8'],
  ['header_length past the first cluster', 'small', (b) => b.writeUInt32BE(520, 100), ErrorCodes.INVALID_HEADER, 'header_length 520 exceeds the first cluster (512 bytes)'],
  ['crypt_method 1 (AES)', 'v3', (b) => b.writeUInt32BE(1, 32), ErrorCodes.ENCRYPTED, 'encrypted images are not supported (crypt_method 1: AES)'],
  ['crypt_method 2 (LUKS)', 'v3', (b) => b.writeUInt32BE(2, 32), ErrorCodes.ENCRYPTED, /^encrypted images are not supported/],
  ['virtual size above 2^53', 'v3', (b) => b.writeBigUInt64BE(1n << 60n, 24), ErrorCodes.INVALID_HEADER, `virtual size ${1n << 60n} exceeds 2^53`],
  ['refcount_order 7', 'v3', (b) => b.writeUInt32BE(7, 96), ErrorCodes.INVALID_HEADER, 'refcount_order 7 exceeds 6 (64-bit refcounts)'],
  ['L1 table offset unaligned', 'v3', (b) => b.writeBigUInt64BE(0x30200n, 40), ErrorCodes.INVALID_HEADER, 'L1 table offset 197120 is not aligned to the cluster size 65536'],
  ['L1 table in the header cluster', 'v3', (b) => b.writeBigUInt64BE(0n, 40), ErrorCodes.INVALID_HEADER, 'L1 table offset 0 overlaps the header cluster'],
  ['L1 table past the end of the file', 'v3', (b) => b.writeBigUInt64BE(1n << 40n, 40), ErrorCodes.INVALID_HEADER, /^L1 table at 1099511627776 \(\+16 bytes\) ends past the end of the file/],
  ['L1 table offset above 2^53', 'v3', (b) => b.writeBigUInt64BE(1n << 62n, 40), ErrorCodes.INVALID_HEADER, /^l1_table_offset 4611686018427387904 exceeds 2\^53/],
  ['L1 table too small for the size', 'v3', (b) => b.writeUInt32BE(1, 36), ErrorCodes.INVALID_HEADER, 'L1 table size 1 entries is too small for virtual size 1073741824 (needs 2)'],
  ['L1 table above 32 MiB', 'v3', (b) => b.writeUInt32BE(0x400001, 36), ErrorCodes.INVALID_HEADER, /^L1 table size 4194305 entries \(33554440 bytes\) exceeds the 33554432 byte limit/],
  ['refcount table offset unaligned', 'v3', (b) => b.writeBigUInt64BE(0x10008n, 48), ErrorCodes.INVALID_HEADER, /^refcount table offset 65544 is not aligned/],
  ['no refcount table', 'v3', (b) => b.writeUInt32BE(0, 56), ErrorCodes.INVALID_HEADER, 'refcount_table_clusters is 0: the image has no refcount table'],
  ['refcount table above 8 MiB', 'v3', (b) => b.writeUInt32BE(129, 56), ErrorCodes.INVALID_HEADER, /^refcount table of 129 clusters \(8454144 bytes\) exceeds the 8388608 byte limit/],
  ['refcount table past the end of the file', 'v3', (b) => b.writeUInt32BE(100, 56), ErrorCodes.INVALID_HEADER, /^refcount table at 65536 \(\+6553600 bytes\) ends past the end of the file/],
  ['too many snapshots', 'v3', (b) => b.writeUInt32BE(65537, 60), ErrorCodes.INVALID_HEADER, 'nb_snapshots 65537 exceeds 65536'],
  ['snapshot table offset unaligned', 'v3', (b) => b.writeBigUInt64BE(12345n, 64), ErrorCodes.INVALID_HEADER, /^snapshot table offset 12345 is not aligned/],
  ['snapshot table past the end of the file', 'v3', (b) => { b.writeUInt32BE(1, 60); b.writeBigUInt64BE(0x100000n, 64); }, ErrorCodes.INVALID_HEADER, /^snapshot table at 1048576 \(\+1 bytes\) ends past the end of the file/],
  ['compression_type 2', 'v3', (b) => { b[104] = 2; b[79] |= 8; }, ErrorCodes.INVALID_HEADER, 'compression_type 2 is unknown (0 zlib, 1 zstd)'],
  ['compression_type 1 without its bit', 'v3', (b) => { b[104] = 1; }, ErrorCodes.INVALID_HEADER, 'compression_type 1 needs the compression type bit (incompatible bit 3), which is clear'],
  ['compression type bit with zlib', 'v3', (b) => { b[79] |= 8; }, ErrorCodes.INVALID_HEADER, /^compression type bit \(incompatible bit 3\) is set, but compression_type is 0/],
  ['extended L2 with 512-byte clusters', 'small', (b) => { b[79] |= 16; }, ErrorCodes.INVALID_HEADER, 'extended L2 entries need cluster_bits >= 14, got 9'],
  ['unknown incompatible bit, unnamed', 'v3', (b) => { b[79] |= 0x20; b[75] = 1; }, ErrorCodes.UNKNOWN_FEATURE, 'Unsupported qcow2 feature(s): Unknown incompatible feature: 100000020'],
  ['backing file name above 1023 bytes', 'v3', (b) => { b.writeBigUInt64BE(512n, 8); b.writeUInt32BE(1024, 16); }, ErrorCodes.INVALID_HEADER, 'backing file name length 1024 exceeds 1023 bytes'],
  ['backing file name past the first cluster', 'small', (b) => { b.writeBigUInt64BE(500n, 8); b.writeUInt32BE(20, 16); }, ErrorCodes.INVALID_HEADER, 'backing file name at 500 (+20 bytes) ends past the first cluster (512 bytes)'],
  ['backing file name inside the header', 'v3', (b) => { b.writeBigUInt64BE(64n, 8); b.writeUInt32BE(4, 16); }, ErrorCodes.INVALID_HEADER, 'backing file name offset 64 lies inside the header (112 bytes)'],
  ['backing file name over the extensions', 'v3', (b) => { b.writeBigUInt64BE(200n, 8); b.writeUInt32BE(4, 16); }, ErrorCodes.INVALID_HEADER, 'header extension 0x6803f857 at offset 112 with length 384 ends past 200 (end of the extension area)'],
];

for (const [title, base, edit, code, message] of FIXED_CASES) {
  test(`refused: ${title}`, (t) => {
    expectInvalid(t, patched(bases[base], edit), code, message);
  });
}

test('refused: unknown incompatible bits named by the feature name table, in table order', (t) => {
  const names = Buffer.alloc(96);
  names[0] = 0;
  names[1] = 9;
  names.write('fancy bit', 2);
  names[48] = 0;
  names[49] = 7;
  names.write('older bit', 50);
  const buf = withExtensions(bases.v3, [{ type: ExtensionType.FEATURE_NAMES, data: names }], (b) => b.writeBigUInt64BE((1n << 7n) | (1n << 9n) | (1n << 40n), 72));
  expectInvalid(t, buf, ErrorCodes.UNKNOWN_FEATURE, 'Unsupported qcow2 feature(s): fancy bit, older bit, Unknown incompatible feature: 10000000000');
});

/** Extension-area checks: [title, extensions, code, message]. */
const EXTENSION_CASES: [string, HeaderExtension[], string, RegExp | string][] = [
  ['feature table length not a multiple of 48', [{ type: ExtensionType.FEATURE_NAMES, data: Buffer.alloc(50) }], ErrorCodes.INVALID_HEADER, 'feature name table length 50 is not a multiple of 48'],
  ['feature table entry for bit 64', [{ type: ExtensionType.FEATURE_NAMES, data: Buffer.from([0, 64, ...Buffer.alloc(46)]) }], ErrorCodes.INVALID_HEADER, 'feature name table entry 0 names bit 64, outside 0..63'],
  ['conflicting backing formats', [{ type: ExtensionType.BACKING_FORMAT, data: Buffer.from('raw') }, { type: ExtensionType.BACKING_FORMAT, data: Buffer.from('qcow2') }], ErrorCodes.INVALID_HEADER, 'header extension 0xe2792aca appears twice with different contents'],
  ['backing format name above 1023 bytes', [{ type: ExtensionType.BACKING_FORMAT, data: Buffer.alloc(1024, 0x61) }], ErrorCodes.INVALID_HEADER, 'backing format name length 1024 exceeds 1023 bytes'],
  ['bitmaps extension of 16 bytes', [{ type: ExtensionType.BITMAPS, data: Buffer.alloc(16) }], ErrorCodes.INVALID_HEADER, 'bitmaps extension length 16 is not 24'],
  ['full disk encryption pointer without encryption', [{ type: ExtensionType.FULL_DISK_ENCRYPTION, data: Buffer.alloc(16) }], ErrorCodes.INVALID_HEADER, /^full disk encryption header extension present, but crypt_method is 0/],
  ['full disk encryption extension of 8 bytes', [{ type: ExtensionType.FULL_DISK_ENCRYPTION, data: Buffer.alloc(8) }], ErrorCodes.INVALID_HEADER, 'full disk encryption extension length 8 is not 16'],
  ['full disk encryption header past the end of the file', [{ type: ExtensionType.FULL_DISK_ENCRYPTION, data: Buffer.from('0000000000100000' + '0000000000001000', 'hex') }], ErrorCodes.INVALID_HEADER, /^encryption header at 1048576 \(\+4096 bytes\) ends past the end of the file/],
  ['full disk encryption pointer unaligned', [{ type: ExtensionType.FULL_DISK_ENCRYPTION, data: Buffer.from('0000000000000200' + '0000000000000010', 'hex') }], ErrorCodes.INVALID_HEADER, 'encryption header offset 512 is not aligned to the cluster size 65536'],
];

for (const [title, extensions, code, message] of EXTENSION_CASES) {
  test(`refused: ${title}`, (t) => {
    expectInvalid(t, withExtensions(bases.v3, extensions), code, message);
  });
}

/** The bitmaps extension fields: [title, nb, reserved, size, offset, message]. */
const BITMAP_EXTENSION_CASES: [string, number, number, bigint, bigint, RegExp | string][] = [
  ['no bitmaps', 0, 0, 24n, 0x10000n, 'bitmaps extension: nb_bitmaps 0 is outside 1..65535'],
  ['65536 bitmaps', 65536, 0, 24n * 65536n, 0x10000n, 'bitmaps extension: nb_bitmaps 65536 is outside 1..65535'],
  ['reserved field set', 1, 5, 32n, 0x10000n, 'bitmaps extension: reserved field is 5, must be 0'],
  ['directory above 64 MiB', 1, 0, (64n << 20n) + 8n, 0x10000n, 'bitmap directory size 67108872 exceeds 67108864'],
  ['directory smaller than its entries', 2, 0, 40n, 0x10000n, 'bitmap directory size 40 is below the 48 bytes 2 entries need'],
  ['directory unaligned', 1, 0, 32n, 0x10100n, 'bitmap directory offset 65792 is not aligned to the cluster size 65536'],
  ['directory past the end of the file', 1, 0, 32n, 1n << 30n, /^bitmap directory at 1073741824 \(\+32 bytes\) ends past the end of the file/],
];

for (const [title, nb, reserved, size, offset, message] of BITMAP_EXTENSION_CASES) {
  test(`refused: bitmaps extension, ${title}`, (t) => {
    const data = Buffer.alloc(24);
    data.writeUInt32BE(nb, 0);
    data.writeUInt32BE(reserved, 4);
    data.writeBigUInt64BE(size, 8);
    data.writeBigUInt64BE(offset, 16);
    expectInvalid(t, withExtensions(bases.v3, [{ type: ExtensionType.BITMAPS, data }]), ErrorCodes.INVALID_HEADER, message);
  });
}

test('refused: a buffer without the whole first cluster', (t) => {
  const error = t.throws(() => parseHeader(bases.v3.subarray(0, 4096), bases.v3.length), { code: ErrorCodes.INVALID_ARGUMENT });
  t.is(error?.message, 'parseHeader needs the first cluster (65536 bytes), got 4096');
});

test('refused: a header shorter than 72 bytes', (t) => {
  expectInvalid(t, bases.v3.subarray(0, 60), ErrorCodes.INVALID_HEADER, 'qcow2 header too short: 60 bytes, at least 72 needed');
});

test('refused: an extension whose length runs past the first cluster', (t) => {
  const buf = patched(bases.v3, (b) => {
    b.writeUInt32BE(0x1234, 112);
    b.writeUInt32BE(70000, 116);
  });
  expectInvalid(t, buf, ErrorCodes.INVALID_HEADER, 'header extension 0x00001234 at offset 112 with length 70000 ends past 65536 (end of the extension area)');
});

test('refused: no end-of-extensions marker before the end of the first cluster', (t) => {
  // 512-byte clusters (qemu-img leaves the feature table out): an unknown extension fills 112..512.
  const buf = patched(bases.small, (b) => {
    b.writeUInt32BE(0x4242, 112);
    b.writeUInt32BE(392, 116);
  });
  expectInvalid(t, buf, ErrorCodes.INVALID_HEADER, 'header extension at offset 512 runs past 512 (end of the extension area) without an end marker');
});

test('accepted: identical duplicate extensions, unknown types twice, external data file bit without a name', (t) => {
  const fmt = { type: ExtensionType.BACKING_FORMAT, data: Buffer.from('qcow2') };
  const unknown = { type: 0x77, data: Buffer.from([1, 2, 3]) };
  const header = parseHeader(withExtensions(bases.v3, [fmt, unknown, fmt, unknown], (b) => (b[79] |= 4)), bases.v3.length);
  t.is(header.backingFormat, 'qcow2');
  t.is(header.extensions.length, 4);
  t.true(header.externalDataFile);
  t.is(header.dataFile, undefined);
});

test('accepted: header_length 104 has no compression type field (zlib) and extensions start at 104', (t) => {
  const buf = patched(bases.v3, (b) => b.writeUInt32BE(104, 100));
  const header = parseHeader(buf, buf.length);
  t.like(header, { headerLength: 104, compressionType: 'zlib', extensions: [], unknownHeaderFields: Buffer.alloc(0) });
  t.deepEqual(serializeHeader(header), buf.subarray(0, 112));
});

test('accepted: version 2 ignores the version 3 fields and takes refcount_order 4', (t) => {
  const buf = patched(bases.v2, (b) => b.writeUInt32BE(7, 96));
  const header = parseHeader(buf, buf.length);
  t.like(header, { version: 2, refcountOrder: 4, headerLength: 72, incompatibleFeatures: 0n });
});

/** Write `buf` as an image and read its snapshot table. */
async function snapshotsOf(t: ExecutionContext, buf: Buffer) {
  const file = path.join(bases.dir, `snap-${Math.random().toString(36).slice(2)}.qcow2`);
  await writeFile(file, buf);
  t.teardown(() => rm(file));
  const meta = await openMetadataFile(file);
  try {
    return await readSnapshots(meta, await readHeaderFrom(meta));
  } finally {
    await meta.handle.close();
  }
}

test('snapshot table: the entries qemu-img wrote', async (t) => {
  const { entries } = await snapshotsOf(t, bases.snapshots);
  t.deepEqual(
    entries.map((e) => [e.id, e.name, e.vmStateSize, e.diskSize, e.icount, e.extraData.length]),
    [
      ['1', 'first', 0, 16 << 20, 0n, 24],
      ['2', 'second', 0, 16 << 20, 0n, 24],
    ],
  );
});

/** Snapshot table corruptions: [title, edit(buffer, table offset), message]. */
const SNAPSHOT_CASES: [string, (b: Buffer, at: number) => void, RegExp | string][] = [
  ['one more entry than the table holds', (b) => b.writeUInt32BE(3, 60), /^snapshot table: entry 2 at offset \d+ lies past the end of the file/],
  ['extra data above 1024 bytes', (b, at) => b.writeUInt32BE(1025, at + 36), 'snapshot 0: extra data size 1025 exceeds 1024'],
  ['L1 table offset unaligned', (b, at) => b.writeBigUInt64BE(0x50008n, at), 'snapshot 0: L1 table offset 327688 is not aligned to the cluster size 65536'],
  ['L1 table past the end of the file', (b, at) => b.writeBigUInt64BE(1n << 40n, at), /^snapshot 0: L1 table at 1099511627776 \(\+8 bytes\) lies outside/],
  ['L1 table above 32 MiB', (b, at) => b.writeUInt32BE(0x400001, at + 8), 'snapshot 0: L1 table size 4194305 entries exceeds the 33554432 byte limit'],
  ['name running past the end of the file', (b, at) => b.writeUInt16BE(65535, at + 14), /^snapshot table: entry 0 at offset \d+ lies past the end of the file/],
  ['VM state size above 2^53', (b, at) => b.writeBigUInt64BE(1n << 60n, at + 40), `snapshot 0: VM state size ${1n << 60n} exceeds 2^53`],
];

for (const [title, edit, message] of SNAPSHOT_CASES) {
  test(`snapshot table refused: ${title}`, async (t) => {
    const at = Number(bases.snapshots.readBigUInt64BE(64));
    const buf = patched(bases.snapshots, (b) => edit(b, at));
    await t.throwsAsync(snapshotsOf(t, buf), { code: ErrorCodes.CORRUPT, message });
  });
}

test('snapshot table refused: larger than 64 MiB', async (t) => {
  // 1100 entries with 65535-byte names (about 72 MB) in a sparse file of 128 MiB.
  const at = Number(bases.snapshots.readBigUInt64BE(64));
  const buf = patched(bases.snapshots, (b) => b.writeUInt32BE(1100, 60));
  const file = path.join(bases.dir, 'huge-snapshots.qcow2');
  await writeFile(file, buf.subarray(0, at));
  t.teardown(() => rm(file));
  const handle = await open(file, 'r+');
  const entry = Buffer.alloc(40);
  entry.writeUInt16BE(65535, 14);
  const stride = Math.ceil((40 + 65535) / 8) * 8;
  for (let i = 0; i < 1100; i++) await handle.write(entry, 0, 40, at + i * stride);
  await handle.truncate(128 << 20);
  await handle.close();
  const meta = await openMetadataFile(file);
  t.teardown(() => meta.handle.close());
  await t.throwsAsync(readSnapshots(meta, await readHeaderFrom(meta)), {
    code: ErrorCodes.CORRUPT,
    message: /^snapshot table: entry 1023 at offset \d+ lies past the 67108864 byte table limit$/,
  });
});

/** Write `buf` as an image and read its bitmap directory. */
async function bitmapsOf(t: ExecutionContext, buf: Buffer) {
  const file = path.join(bases.dir, `bm-${Math.random().toString(36).slice(2)}.qcow2`);
  await writeFile(file, buf);
  t.teardown(() => rm(file));
  const meta = await openMetadataFile(file);
  try {
    return await readBitmaps(meta, await readHeaderFrom(meta));
  } finally {
    await meta.handle.close();
  }
}

function bitmapDirectory(b: Buffer): number {
  const header = parseHeader(b, b.length);
  return header.bitmaps!.bitmapDirectoryOffset;
}

test('bitmap directory: the entries qemu-img wrote', async (t) => {
  const entries = await bitmapsOf(t, bases.bitmaps);
  t.deepEqual(
    entries.map((e) => [e.name, e.granularity, e.auto, e.inUse, e.type, e.bitmapTableSize]),
    [
      ['one', 65536, true, false, 1, 1],
      ['two', 65536, true, false, 1, 1],
    ],
  );
});

/** Bitmap directory corruptions (first entry at `at`): [title, edit, message]. */
const BITMAP_CASES: [string, (b: Buffer, at: number) => void, RegExp | string][] = [
  ['type 2', (b, at) => (b[at + 16] = 2), 'bitmap 0: type 2 is not 1 (dirty tracking)'],
  ['granularity bits 8', (b, at) => (b[at + 17] = 8), 'bitmap 0: granularity bits 8 is outside 9..31'],
  ['granularity bits 32', (b, at) => (b[at + 17] = 32), 'bitmap 0: granularity bits 32 is outside 9..31'],
  ['reserved flags', (b, at) => b.writeUInt32BE(0x12, at + 12), 'bitmap 0: reserved flag bits 0x10 are set'],
  ['empty name', (b, at) => b.writeUInt16BE(0, at + 18), /^bitmap 0: name size 0 is outside 1..1023/],
  ['name running past the directory', (b, at) => b.writeUInt16BE(1000, at + 18), /^bitmap 0: entry of 1024 bytes at 0 runs past the directory size/],
  ['bitmap table of the wrong size', (b, at) => b.writeUInt32BE(2, at + 8), 'bitmap 0: bitmap table size 2 entries does not match the 1 the disk size needs'],
  ['bitmap table unaligned', (b, at) => b.writeBigUInt64BE(0x40100n, at), 'bitmap 0: bitmap table offset 262400 is not aligned to the cluster size 65536'],
  ['bitmap table past the end of the file', (b, at) => b.writeBigUInt64BE(1n << 40n, at), /^bitmap 0: bitmap table at 1099511627776 \(\+8 bytes\) lies outside/],
  ['duplicate names', (b, at) => b.write('one', at + 32 + 24), "bitmap 1: name 'one' is used twice"],
];

for (const [title, edit, message] of BITMAP_CASES) {
  test(`bitmap directory refused: ${title}`, async (t) => {
    const buf = patched(bases.bitmaps, (b) => edit(b, bitmapDirectory(b)));
    await t.throwsAsync(bitmapsOf(t, buf), { code: ErrorCodes.CORRUPT, message });
  });
}

test('bitmap directory refused: entries not filling the directory size', async (t) => {
  const buf = patched(bases.bitmaps, (b) => {
    const header = parseHeader(b, b.length);
    const ext = b.indexOf(Buffer.from('23852875', 'hex'));
    b.writeBigUInt64BE(BigInt(header.bitmaps!.bitmapDirectorySize + 8), ext + 16);
  });
  // The directory is the last thing in the file: 8 more bytes keep the longer directory inside it.
  await t.throwsAsync(bitmapsOf(t, Buffer.concat([buf, Buffer.alloc(8)])), { code: ErrorCodes.CORRUPT, message: 'bitmap directory: 2 entries take 64 bytes, the extension says 72' });
});

test('readHeader reports header errors for files, too', async (t) => {
  const file = path.join(bases.dir, 'bad-cluster-bits.qcow2');
  await writeFile(file, patched(bases.v3, (b) => b.writeUInt32BE(30, 20)));
  await t.throwsAsync(readHeader(file), { code: ErrorCodes.INVALID_HEADER, message: 'cluster_bits 30 is outside 9..21' });
  const short = path.join(bases.dir, 'short.qcow2');
  await writeFile(short, bases.v3.subarray(0, 100));
  await t.throwsAsync(readHeader(short), { code: ErrorCodes.INVALID_HEADER, message: 'qcow2 header too short: 100 bytes, a version 3 header needs 104' });
});
