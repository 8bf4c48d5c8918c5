/** `qcow2 map` against `qemu-img map`: the same text and JSON on raw and qcow2 images. */
import { truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { open } from '../ts/index.js';
import { native } from '../ts/native.js';
import { MapTable, mapImage } from '../ts/tools/map.js';
import { CLI, qcow2Cli, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';

/** Run both maps with `args` and assert the same exit code, stdout, and (for JSON) the same parsed list. */
async function sameMap(t: ExecutionContext, file: string, ...args: string[]): Promise<void> {
  for (const output of ['human', 'json']) {
    const theirs = await runProgram('qemu-img', ['map', `--output=${output}`, ...args, file]);
    const ours = await qcow2Cli('map', `--output=${output}`, ...args, file);
    t.is(ours.stdout, theirs.stdout, `${output} map of ${path.basename(file)} ${args.join(' ')}`);
    t.is(ours.code, theirs.code, `exit code of the ${output} map of ${path.basename(file)}: ${ours.stderr}`);
    t.is(ours.stderr.replace(/^qcow2: /gm, ''), theirs.stderr.replace(/^qemu-img: /gm, ''));
    if (output === 'json' && theirs.code === 0) t.deepEqual(JSON.parse(ours.stdout), JSON.parse(theirs.stdout));
  }
}

/** A 10 MiB raw image with data runs, a written zero run and holes. */
async function rawWithHoles(t: ExecutionContext): Promise<string> {
  const file = path.join(await tempDir(t), 'holes.raw');
  await writeFile(file, '');
  await truncate(file, 10 << 20);
  await qemuIo('-f', 'raw', '-c', 'write -P 1 1M 64k', '-c', 'write -P 0 3M 128k', '-c', 'write -P 2 5M 4k', '-c', 'write -P 3 9M 1M', file);
  return file;
}

test('raw image with holes: same human and JSON map as qemu-img', async (t) => {
  const file = await rawWithHoles(t);
  await sameMap(t, file);
  await sameMap(t, file, '-f', 'raw');
});

test('raw image: --start-offset and --max-length cut the map like qemu-img', async (t) => {
  const file = await rawWithHoles(t);
  await sameMap(t, file, '--start-offset', '1M', '--max-length', '100k');
  await sameMap(t, file, '--start-offset=1000', '--max-length=10');
  await sameMap(t, file, '--start-offset', '3M');
  await sameMap(t, file, '--max-length', '5M');
  await sameMap(t, file, '--start-offset', '10M');
  await sameMap(t, file, '--start-offset', '20M');
});

test('empty raw image: qemu-img prints an empty run', async (t) => {
  const file = path.join(await tempDir(t), 'empty.raw');
  await writeFile(file, '');
  await sameMap(t, file);
});

test('bad arguments fail with exit code 1 like qemu-img', async (t) => {
  const file = await rawWithHoles(t);
  for (const args of [['--output=xml', file], ['--start-offset', 'x', file], ['--start-offset', '-5', file], [], [file, file]]) {
    const ours = await qcow2Cli('map', ...args);
    const theirs = await runProgram('qemu-img', ['map', ...args]);
    t.is(ours.code, 1, args.join(' '));
    t.is(theirs.code, 1, args.join(' '));
    t.is(ours.stdout, '');
  }
  const missing = await qcow2Cli('map', path.join(path.dirname(file), 'missing.raw'));
  t.is(missing.code, 1);
  t.regex(missing.stderr, /Could not open '.*missing\.raw'/);
});

test('qcow2 image: data, zero clusters, unallocated clusters, partial cluster ranges', async (t) => {
  const file = path.join(await tempDir(t), 'plain.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', file, '10M');
  await qemuIo('-c', 'write -P 1 0 64k', '-c', 'write -z 1M 64k', '-c', 'write -P 2 2M 192k', '-c', 'write -P 3 5M 64k', '-c', 'write -P 4 4M 64k', file);
  // Zeroing allocated clusters without unmap keeps their host offsets (zero, present, offset).
  await qemuIo('-c', 'write -z -u 2112k 64k', '-c', 'write -z 5M 64k', '-c', 'write -z 0 64k', file);
  await sameMap(t, file);
  await sameMap(t, file, '--start-offset', '1000', '--max-length', '3M');
});

test('qcow2 version 2 and extended L2 images: subcluster runs like qemu-img', async (t) => {
  const dir = await tempDir(t);
  const v2 = path.join(dir, 'v2.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '4M');
  await qemuIo('-c', 'write -P 1 0 64k', '-c', 'write -z 1M 64k', '-c', 'write -P 4 3M 64k', '-c', 'write -z 3M 64k', v2);
  await sameMap(t, v2);
  const extended = path.join(dir, 'extended.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', extended, '4M');
  await qemuIo('-c', 'write -P 1 0 64k', '-c', 'write -z 0 8k', '-c', 'write -P 2 24k 8k', '-c', 'write -z 2M 64k', extended);
  await sameMap(t, extended);
  // Unallocated subclusters inside allocated clusters: qemu-img shows their host offset when no
  // backing image lies below, and the backing's runs when one does.
  const partial = path.join(dir, 'partial.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', partial, '1M');
  await qemuIo('-c', 'write -P 1 0 2k', '-c', 'write -P 2 40k 2k', '-c', 'write -z 200k 2k', partial);
  await sameMap(t, partial);
  const base = path.join(dir, 'base.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', base, '1M');
  await qemuIo('-c', 'write -P 9 0 512k', base);
  const overlay = path.join(dir, 'overlay.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', base, '-F', 'qcow2', overlay);
  await qemuIo('-c', 'write -P 1 0 2k', '-c', 'write -z 8k 2k', '-c', 'write -P 3 600k 2k', overlay);
  await sameMap(t, overlay);
});

test('qcow2 image with compressed clusters: JSON matches, human fails like qemu-img', async (t) => {
  const file = path.join(await tempDir(t), 'compressed.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', file, '4M');
  await qemuIo('-c', 'write -P 1 0 64k', '-c', 'write -c -P 3 1M 128k', '-c', 'write -P 5 3M 64k', file);
  await sameMap(t, file);
  const image = await open(file, { readOnly: true });
  t.teardown(() => image.close());
  const entries = [];
  for await (const batch of mapImage(image)) entries.push(...batch);
  const compressed = entries.filter((e) => e.compressed);
  t.deepEqual(
    compressed.map(({ start, length, data, offset }) => ({ start, length, data, offset })),
    [{ start: 1 << 20, length: 128 << 10, data: true, offset: undefined }],
  );
  t.true(entries.filter((e) => !e.compressed && e.data).every((e) => e.offset !== undefined && e.file === file));
});

test('backing chain of depth 3 mixing raw and qcow2: depth, present and files like qemu-img', async (t) => {
  const dir = await tempDir(t);
  const base = path.join(dir, 'base.raw');
  const middle = path.join(dir, 'middle.qcow2');
  const top = path.join(dir, 'top.qcow2');
  await writeFile(base, '');
  await truncate(base, 8 << 20);
  await qemuIo('-f', 'raw', '-c', 'write -P 1 0 1M', '-c', 'write -P 2 6M 64k', base);
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', middle);
  await qemuIo('-c', 'write -P 3 512k 1M', '-c', 'write -z 6M 64k', middle);
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'middle.qcow2', '-F', 'qcow2', top, '12M');
  await qemuIo('-c', 'write -P 4 64k 64k', '-c', 'write -z 3M 64k', '-c', 'write -P 5 10M 64k', top);
  await sameMap(t, top);
  await sameMap(t, middle);
  await sameMap(t, top, '--start-offset', '100k', '--max-length', '7M');
});

test('qcow2 image with an external data file: offsets and file name like qemu-img', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'ext.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${path.join(dir, 'ext.data')}`, file, '4M');
  await qemuIo('-c', 'write -P 1 64k 128k', '-c', 'write -z 1M 64k', '-c', 'write -P 2 3M 64k', file);
  await sameMap(t, file);
});

test('a map of 40 000 runs, in several engine batches and tables, equals qemu-img map', async (t) => {
  const dir = await tempDir(t);
  const raw = path.join(dir, 'striped.raw');
  const content = Buffer.alloc(20000 * 1024);
  for (let i = 0; i < 20000; i++) content.fill((i % 250) + 1, i * 1024, i * 1024 + 512);
  await writeFile(raw, content);
  const file = path.join(dir, 'striped.qcow2');
  await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', raw, file);
  await sameMap(t, file);
});

test('a file name outside ASCII is printed in UTF-8 like qemu-img', async (t) => {
  const file = path.join(await tempDir(t), 'disque-été-ü.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', file, '1M');
  await qemuIo('-c', 'write -P 1 64k 128k', file);
  await sameMap(t, file);
});

test('mapImage merges runs and yields batches covering the range without gaps', async (t) => {
  const file = await rawWithHoles(t);
  const image = await open(file, { readOnly: true });
  t.teardown(() => image.close());
  let pos = 1 << 20;
  for await (const batch of mapImage(image, { start: pos, maxLength: 8 << 20 })) {
    for (const entry of batch) {
      t.is(entry.start, pos);
      pos += entry.length;
    }
  }
  t.is(pos, 9 << 20);
});

test('backing file names combine with the overlay name as given, like qemu ("./o.qcow2" → "./b.qcow2")', async (t) => {
  const dir = await tempDir(t);
  await qemuImg('create', '-f', 'qcow2', path.join(dir, 'b.qcow2'), '1M');
  await qemuIo('-c', 'write -P 1 0 64k', path.join(dir, 'b.qcow2'));
  await qemuImg('create', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', path.join(dir, 'o.qcow2'));
  const run = (program: string, args: string[]) => runProgram(program, args, { cwd: dir });
  const theirs = await run('qemu-img', ['map', './o.qcow2']);
  const ours = await run(process.execPath, [CLI, 'map', './o.qcow2']);
  t.is(theirs.code, 0, theirs.stderr);
  t.regex(theirs.stdout, /\.\/b\.qcow2/);
  t.is(ours.stdout, theirs.stdout);
});

test('formatMapJson writes qemu-img JSON lines and refuses a buffer without room or wrong columns', (t) => {
  const table = new MapTable();
  table.count = 2;
  table.start.set([0, 2 ** 40]);
  table.length.set([2 ** 40, 65536]);
  table.bits.set([2, 5]);
  table.offset.set([-1, 123456789012]);
  const out = Buffer.alloc(2 * native.mapJsonLineMax);
  const end = native.formatMapJson(table.start, table.length, table.depth, table.bits, table.offset, 2, out, 0, true);
  t.is(
    out.toString('latin1', 0, end),
    '{ "start": 0, "length": 1099511627776, "depth": 0, "present": false, "zero": true, "data": false},\n' +
      '{ "start": 1099511627776, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 123456789012}',
  );
  const small = Buffer.alloc(native.mapJsonLineMax);
  t.throws(() => native.formatMapJson(table.start, table.length, table.depth, table.bits, table.offset, 2, small, 0, true), {
    instanceOf: RangeError,
    message: /room for 2 lines/,
  });
  t.throws(() => native.formatMapJson(table.start, table.start, table.start as never, table.bits, table.offset, 1, out, 0, true), {
    instanceOf: TypeError,
  });
});
