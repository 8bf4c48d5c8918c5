/** The qcow2 header: parse → serialise is byte-identical on every kind of image qemu-img makes; edits serialise right. */
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test from 'ava';

import { ErrorCodes } from '../ts/errors.js';
import { ExtensionType } from '../ts/qcow2/extensions.js';
import { clearUnknownAutoclear, parseHeader, readHeader, serializeHeader } from '../ts/qcow2/header.js';
import { qemuImg, runProgram, tempDir } from './helpers/qemu.js';
import { VARIANTS, qemuImgIn } from './helpers/qcow2-variants.js';

for (const variant of VARIANTS) {
  test(`header round trip: ${variant.name}`, async (t) => {
    const dir = await tempDir(t);
    const file = await variant.make(dir);
    const { header, fileSize } = await readHeader(file);
    t.like(header, variant.expect as never);
    const bytes = await readFile(file);
    t.is(fileSize, bytes.length);
    const out = serializeHeader(header);
    t.true(out.length <= header.clusterSize);
    t.deepEqual(out, bytes.subarray(0, out.length), 'serialised header area equals the file');
    // The backing file name (when any) is the last thing in the area, right after the end marker.
    if (header.backingFile !== undefined) t.is(header.backingFileOffset + header.backingFileSize, out.length);
  });
}

test('header fields of a 1 GiB qemu-img image', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'a.qcow2');
  await qemuImg('create', '-f', 'qcow2', file, '1G');
  const { header } = await readHeader(file);
  t.like(header, {
    version: 3,
    clusterBits: 16,
    clusterSize: 65536,
    size: 1 << 30,
    cryptMethod: 0,
    l1Size: 2,
    l1TableOffset: 0x30000,
    refcountTableOffset: 0x10000,
    refcountTableClusters: 1,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    refcountOrder: 4,
    headerLength: 112,
    compressionType: 'zlib',
    dirty: false,
    corrupt: false,
    externalDataFile: false,
    extendedL2: false,
    lazyRefcounts: false,
    dataFileRaw: false,
    bitmapsAutoclear: false,
    backingFile: undefined,
    backingFormat: undefined,
    dataFile: undefined,
    bitmaps: undefined,
  });
  t.is(header.extensions.length, 1);
  t.is(header.extensions[0].type, ExtensionType.FEATURE_NAMES);
  t.deepEqual(
    header.featureNames.map((f) => `${f.type}:${f.bit}:${f.name}`),
    [
      'incompatible:0:dirty bit',
      'incompatible:1:corrupt bit',
      'incompatible:2:external data file',
      'incompatible:3:compression type',
      'incompatible:4:extended L2 entries',
      'compatible:0:lazy refcounts',
      'autoclear:0:bitmaps',
      'autoclear:1:raw external data',
    ],
  );
});

test('unknown extensions and header fields survive a rewrite byte for byte', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'u.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-b', 'base.img', '-F', 'raw', '-u', file, '1M');
  const { header, fileSize } = await readHeader(file);
  const odd = { type: 0x12345678, data: Buffer.from('seven b') };
  const empty = { type: 0x0badcafe, data: Buffer.alloc(0) };
  header.extensions = [odd, ...header.extensions, empty];
  header.headerLength = 120;
  header.unknownHeaderFields = Buffer.from('future!!abcdefg').subarray(0, 15);
  const area = serializeHeader(header);
  const cluster = Buffer.concat([area, Buffer.alloc(header.clusterSize - area.length)]);
  const again = parseHeader(cluster, fileSize);
  t.deepEqual(again.extensions.map((e) => [e.type, e.data.toString('hex')]), header.extensions.map((e) => [e.type, e.data.toString('hex')]));
  t.deepEqual(again.unknownHeaderFields, header.unknownHeaderFields);
  t.is(again.backingFile, 'base.img');
  t.is(again.backingFormat, 'raw');
  t.deepEqual(serializeHeader(again), area);
});

test('names that are not UTF-8 keep their bytes through parse and serialise', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'n.qcow2');
  await qemuImgIn(dir, 'create', '-f', 'qcow2', '-u', '-b', 'BACKINGNAME', '-F', 'raw', '-o', 'data_file=DATAFILE', file, '1M');
  const bytes = await readFile(file);
  Buffer.from([0x62, 0xff, 0xc0, 0x80, 0xe2, 0x82, 0x41, 0xed, 0xa0, 0x80, 0xf4]).copy(bytes, bytes.indexOf('BACKINGNAME'));
  Buffer.from([0xfe, 0x64, 0xf0, 0x9f, 0x98, 0x80, 0x80, 0xe9]).copy(bytes, bytes.indexOf('DATAFILE'));
  await writeFile(file, bytes);
  const { header } = await readHeader(file);
  t.is(header.backingFile, 'b\udcff\udcc0\udc80\udce2\udc82A\udced\udca0\udc80\udcf4');
  t.is(header.dataFile, '\udcfed😀\udc80\udce9');
  const out = serializeHeader(header);
  t.deepEqual(out, bytes.subarray(0, out.length));
});

test('edited fields are what serialiseHeader writes: backing file, format, flags', async (t) => {
  const dir = await tempDir(t);
  const base = path.join(dir, 'base.qcow2');
  const file = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-f', 'qcow2', base, '4M');
  await qemuImg('create', '-f', 'qcow2', file, '4M');
  const { header } = await readHeader(file);
  header.backingFile = 'base.qcow2';
  header.backingFormat = 'qcow2';
  header.lazyRefcounts = true;
  header.dirty = true;
  const bytes = await readFile(file);
  serializeHeader(header).copy(bytes);
  await writeFile(file, bytes);
  const { header: again } = await readHeader(file);
  t.like(again, { backingFile: 'base.qcow2', backingFormat: 'qcow2', lazyRefcounts: true, dirty: true, compatibleFeatures: 1n, incompatibleFeatures: 1n });
  // qemu-img agrees with what was written.
  const json = JSON.parse(await qemuImg('info', '--output=json', file));
  t.is(json['backing-filename'], 'base.qcow2');
  t.is(json['backing-filename-format'], 'qcow2');
  t.is(json['dirty-flag'], true);
  t.is(json['format-specific'].data['lazy-refcounts'], true);
  // Dropping the format removes its extension, the name stays.
  header.backingFormat = undefined;
  header.dirty = false;
  serializeHeader(header).copy(bytes);
  await writeFile(file, bytes);
  const { header: third } = await readHeader(file);
  t.is(third.backingFormat, undefined);
  t.is(third.backingFile, 'base.qcow2');
  t.false(third.extensions.some((e) => e.type === ExtensionType.BACKING_FORMAT));
  const check = await runProgram('qemu-img', ['check', file]);
  t.is(check.code, 0, check.stdout + check.stderr);
});

test('clearUnknownAutoclear keeps only the autoclear bits this package maintains', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'b.qcow2');
  await qemuImg('create', '-f', 'qcow2', file, '4M');
  await qemuImg('bitmap', '--add', file, 'b');
  const bytes = await readFile(file);
  bytes.writeBigUInt64BE(0xf0n | 1n, 88);
  const header = parseHeader(bytes.subarray(0, 65536), bytes.length);
  t.is(header.autoclearFeatures, 0xf1n);
  const cleared = clearUnknownAutoclear(header);
  t.is(cleared.autoclearFeatures, 1n);
  t.true(cleared.bitmapsAutoclear);
  const noBitmaps = clearUnknownAutoclear(header, 2n);
  t.is(noBitmaps.autoclearFeatures, 0n);
  t.false(noBitmaps.bitmapsAutoclear);
  t.is(serializeHeader(noBitmaps).readBigUInt64BE(88), 0n);
});

test('serializeHeader refuses what the header cannot hold', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'v2.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=512', file, '1M');
  const { header } = await readHeader(file);
  t.throws(() => serializeHeader({ ...header, lazyRefcounts: true }), { code: ErrorCodes.INVALID_ARGUMENT, message: /version 2 header cannot store feature bits/ });
  t.throws(() => serializeHeader({ ...header, refcountOrder: 3 }), { code: ErrorCodes.INVALID_ARGUMENT, message: /refcount_order 4, got 3/ });
  t.throws(() => serializeHeader({ ...header, backingFile: 'x'.repeat(1024) }), { code: ErrorCodes.INVALID_ARGUMENT, message: /1024 bytes, more than 1023/ });
  t.throws(() => serializeHeader({ ...header, backingFile: 'x'.repeat(500) }), { code: ErrorCodes.INVALID_ARGUMENT, message: /does not fit in the first cluster \(512 bytes\)/ });
  t.throws(() => serializeHeader({ ...header, version: 3, headerLength: 104, compressionType: 'zstd' }), {
    code: ErrorCodes.INVALID_ARGUMENT,
    message: /needs header_length > 104, got 104/,
  });
});

test('readHeader: a missing file and a directory', async (t) => {
  const dir = await tempDir(t);
  const missing = path.join(dir, 'nope.qcow2');
  await t.throwsAsync(readHeader(missing), { code: 'ENOENT', message: `Could not open '${missing}': No such file or directory` });
  await t.throwsAsync(readHeader(dir), { message: `'file' driver requires '${dir}' to be a regular file` });
});
