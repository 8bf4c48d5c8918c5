/** `qcow2 convert -O raw` against `qemu-img convert -O raw`: the same bytes, holes, progress and errors. */
import { open as openFile, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ProgressPrinter } from '../ts/cli/common.js';
import { ErrorCodes, convert, open } from '../ts/index.js';
import { dataAndZeroRuns } from '../ts/tools/convert.js';
import { patternBytes, qcow2Cli, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';

const SIZE = 8 << 20;

/** Bytes a file occupies on disk. */
async function allocated(file: string): Promise<number> {
  return (await stat(file)).blocks * 512;
}

/** A qcow2 image with data, a compressed cluster, zero clusters, and a raw backing file with data of its own. */
async function chainImage(dir: string): Promise<string> {
  const base = path.join(dir, 'base.raw');
  const top = path.join(dir, 'top.qcow2');
  await writeFile(base, '');
  await truncate(base, SIZE);
  await qemuIo('-f', 'raw', '-c', 'write -P 1 0 1M', '-c', 'write -P 2 6M 64k', base);
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', top);
  await qemuIo('-c', 'write -P 3 512k 64k', '-c', 'write -z 6M 64k', '-c', 'write -c -P 4 2M 128k', '-c', 'write -P 5 4M 1M', top);
  // A cluster of written zeroes: data to the image, a hole to a sparse copy.
  await qemuIo('-c', 'write -P 0 5M 64k', top);
  return top;
}

/** A raw image with data and holes. */
async function rawImage(dir: string): Promise<string> {
  const file = path.join(dir, 'source.raw');
  await writeFile(file, '');
  await truncate(file, SIZE);
  await qemuIo('-f', 'raw', '-c', 'write -P 1 1M 64k', '-c', 'write -P 0 3M 128k', '-c', 'write -P 2 5M 4k', file);
  return file;
}

/** Convert `source` with both tools and the same options; assert equal bytes, return both allocations. */
async function convertBoth(
  t: ExecutionContext,
  source: string,
  options: string[],
  prepare?: (target: string) => Promise<void>,
): Promise<{ ours: number; theirs: number }> {
  const dir = path.dirname(source);
  const ours = path.join(dir, 'ours.raw');
  const theirs = path.join(dir, 'theirs.raw');
  if (prepare) {
    await prepare(ours);
    await prepare(theirs);
  }
  await qemuImg('convert', ...options, '-O', 'raw', source, theirs);
  const r = await qcow2Cli('convert', ...options, '-O', 'raw', source, ours);
  t.is(r.code, 0, r.stderr);
  t.is(r.stderr, '');
  t.true((await readFile(ours)).equals(await readFile(theirs)), `bytes of convert ${options.join(' ')}`);
  return { ours: await allocated(ours), theirs: await allocated(theirs) };
}

test('qcow2 over raw backing → raw: same bytes as qemu-img, and as sparse', async (t) => {
  const source = await chainImage(await tempDir(t));
  const { ours, theirs } = await convertBoth(t, source, []);
  t.true(ours <= theirs + 64 * 1024, `ours ${ours} vs qemu-img ${theirs}`);
  t.true(ours < SIZE / 2, `the copy has holes: ${ours} of ${SIZE}`);
});

test('scattered clusters, near and far apart in one 2 MiB window, over a backing with data between them', async (t) => {
  const dir = await tempDir(t);
  const base = path.join(dir, 'base.qcow2');
  const top = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', base, '8M');
  await qemuIo('-c', 'write -P 7 0 8M', base);
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
  // Gaps of 64 KiB (read with their neighbours) and of 1 MiB (not read), in shuffled host order.
  for (const at of ['1984k', '0', '1088k', '128k', '2112k', '4M', '6M']) await qemuIo('-c', `write -P 9 ${at} 64k`, top);
  await qemuIo('-c', 'write -z 3M 64k', top);
  await convertBoth(t, top, []);
  await convertBoth(t, top, ['-W', '-m', '16']);
});

test('zlib and zstd compressed images → raw: same bytes as qemu-img', async (t) => {
  const dir = await tempDir(t);
  const raw = path.join(dir, 'plain.raw');
  await writeFile(raw, Buffer.concat([patternBytes(3 << 20, 5), Buffer.alloc(1 << 20), patternBytes(1 << 20, 9)]));
  for (const type of ['zlib', 'zstd']) {
    const file = path.join(dir, `${type}.qcow2`);
    await qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, raw, file);
    await convertBoth(t, file, []);
  }
});

test('raw with holes → raw: same bytes and holes', async (t) => {
  const source = await rawImage(await tempDir(t));
  const { ours, theirs } = await convertBoth(t, source, ['-f', 'raw']);
  t.true(ours <= theirs + 64 * 1024, `ours ${ours} vs qemu-img ${theirs}`);
  t.true(ours <= 128 * 1024, `only the data is allocated: ${ours}`);
});

test('-S 0 allocates the whole target like qemu-img', async (t) => {
  const source = await chainImage(await tempDir(t));
  const { ours, theirs } = await convertBoth(t, source, ['-S', '0']);
  t.true(theirs >= SIZE);
  t.true(ours >= SIZE, `fully allocated: ${ours} of ${SIZE}`);
});

test('-S 64k keeps shorter zero runs inside data', async (t) => {
  const dir = await tempDir(t);
  const source = path.join(dir, 'zeros.raw');
  const content = patternBytes(1 << 20, 3);
  content.fill(0, 4096, 4096 + 32768);
  content.fill(0, 512 * 1024, 768 * 1024);
  await writeFile(source, content);
  const { ours } = await convertBoth(t, source, ['-f', 'raw', '-S', '64k']);
  t.is(ours, (1 << 20) - 256 * 1024, 'only the 256 KiB zero run became a hole');
});

test('-n writes into an existing target, zeroing where the source is zero', async (t) => {
  const source = await chainImage(await tempDir(t));
  const { ours, theirs } = await convertBoth(t, source, ['-n'], (target) => writeFile(target, patternBytes(SIZE + 4096, 9)));
  t.true(ours < SIZE / 2, `zeroes were punched out: ${ours}`);
  t.true(ours <= theirs + 64 * 1024, `ours ${ours} vs qemu-img ${theirs}`);
});

test('-n --target-is-zero leaves zero runs alone', async (t) => {
  const source = await chainImage(await tempDir(t));
  const { ours } = await convertBoth(t, source, ['-n', '--target-is-zero'], async (target) => {
    await writeFile(target, '');
    await truncate(target, SIZE);
  });
  t.true(ours < SIZE / 2);
});

test('-m 1, -m 16 and -W give the same bytes', async (t) => {
  const source = await chainImage(await tempDir(t));
  await convertBoth(t, source, ['-m', '1']);
  await convertBoth(t, source, ['-m', '16']);
  await convertBoth(t, source, ['-m', '16', '-W', '-t', 'none', '-T', 'none']);
});

test('several sources are concatenated like qemu-img does', async (t) => {
  const dir = await tempDir(t);
  const first = await chainImage(dir);
  const second = path.join(dir, 'second.raw');
  await writeFile(second, patternBytes(100 * 1024 + 512, 7));
  const third = path.join(dir, 'third.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', third, '3M');
  await qemuIo('-c', 'write -P 6 1M 64k', third);
  const theirs = path.join(dir, 'theirs.raw');
  const ours = path.join(dir, 'ours.raw');
  await qemuImg('convert', '-O', 'raw', first, second, third, theirs);
  const r = await qcow2Cli('convert', '-p', '-O', 'raw', first, second, third, ours);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /^ {4}\(0\.00\/100%\)\r.* {4}\(100\.00\/100%\)\r\n$/s);
  t.true((await readFile(ours)).equals(await readFile(theirs)));
});

test('-p prints qemu-img progress lines', async (t) => {
  const dir = await tempDir(t);
  const source = await chainImage(dir);
  const line = String.raw`    \(\d{1,3}\.\d\d/100%\)\r`;
  const shape = new RegExp(String.raw`^    \(0\.00/100%\)\r(${line})*    \(100\.00/100%\)\r\n$`);
  const theirs = await runProgram('qemu-img', ['convert', '-p', '-O', 'raw', source, path.join(dir, 'theirs.raw')]);
  const ours = await qcow2Cli('convert', '-p', '-O', 'raw', source, path.join(dir, 'ours.raw'));
  t.regex(theirs.stdout, shape);
  t.regex(ours.stdout, shape);
  const values = [...ours.stdout.matchAll(/\((\d+\.\d\d)\//g)].map((m) => Number(m[1]));
  t.deepEqual([...values].sort((a, b) => a - b), values, 'progress never goes back');
  const quiet = await qcow2Cli('convert', '-p', '-q', '-O', 'raw', source, path.join(dir, 'ours.raw'));
  t.is(quiet.stdout, '');
});

test('bad arguments are refused with qemu-img messages', async (t) => {
  const dir = await tempDir(t);
  const source = await rawImage(dir);
  const small = path.join(dir, 'small.raw');
  await writeFile(small, Buffer.alloc(4096));
  const target = path.join(dir, 'out.raw');
  const cases: Array<[string[], RegExp]> = [
    [['-c', source, target], /Compression not supported for this file format/],
    [['--target-is-zero', source, target], /--target-is-zero requires use of -n flag/],
    [['-m', '17', source, target], /Invalid number of coroutines/],
    [['-m', '0', source, target], /Invalid number of coroutines/],
    [['-S', '1000', source, target], /Valid sizes are multiples of 512 up to 16777216/],
    [['-n', source, small], /output file is smaller than input file/],
    [['-t', 'bogus', source, target], /Invalid cache option: bogus/],
    [['-T', 'bogus', source, target], /Invalid source cache option: bogus/],
    [[path.join(dir, 'missing.raw'), target], /Could not open '.*missing\.raw'/],
    [[source], /Must specify image file name/],
    [[source, source], /is the source image/],
  ];
  for (const [args, message] of cases) {
    const r = await qcow2Cli('convert', ...args);
    t.is(r.code, 1, args.join(' '));
    t.regex(r.stderr, message);
    if (!args.includes('qcow2') && args[0] !== args[1]) t.is((await runProgram('qemu-img', ['convert', ...args])).code, 1, args.join(' '));
  }
});

test('library: progress reaches the data size, and an aborted convert stops with ABORT_ERR', async (t) => {
  const dir = await tempDir(t);
  const source = await chainImage(dir);
  const target = path.join(dir, 'lib.raw');
  const seen: Array<[number, number]> = [];
  const image = await open(source, { readOnly: true, followFileNames: true });
  t.teardown(() => image.close());
  await convert(image, target, { parallel: 4, onProgress: (done, total) => seen.push([done, total]) });
  const [done, total] = seen[seen.length - 1];
  t.is(done, total);
  t.true(total > 0 && total < SIZE);
  const reference = path.join(dir, 'ref.raw');
  await qemuImg('convert', '-O', 'raw', source, reference);
  t.true((await readFile(target)).equals(await readFile(reference)));
  const controller = new AbortController();
  controller.abort();
  const error = await t.throwsAsync(convert(image, target, { signal: controller.signal }));
  t.is((error as { code?: string }).code, ErrorCodes.ABORTED);
  await t.throwsAsync(convert(source, target), { code: ErrorCodes.FILE_NAME_NOT_ALLOWED });
});

test('dataAndZeroRuns keeps short zero runs as data and aligns granules to guest offsets', (t) => {
  const buffer = Buffer.alloc(20000, 1);
  buffer.fill(0, 3000, 12192);
  t.deepEqual(dataAndZeroRuns(buffer, 1096, 4096), [
    { start: 0, end: 3000, data: true },
    { start: 3000, end: 11192, data: false },
    { start: 11192, end: 20000, data: true },
  ]);
  t.deepEqual(dataAndZeroRuns(buffer, 1096, 16384), [{ start: 0, end: 20000, data: true }]);
});

test('ProgressPrinter prints 0 and 100 always, otherwise only steps larger than the minimum', (t) => {
  let text = '';
  const progress = new ProgressPrinter(true, 1, { write: (s: string) => (text += s) });
  for (const percent of [0, 0.5, 1.5, 2, 2.4, 50, 100 / 3, 100, 100]) progress.set(percent);
  progress.end();
  const lines = ['0.00', '1.50', '50.00', '33.33', '100.00', '100.00'].map((v) => `    (${v}/100%)\r`);
  t.is(text, lines.join('') + '\n');
  let silent = '';
  const off = new ProgressPrinter(false, 1, { write: (s: string) => (silent += s) });
  off.set(0);
  off.end();
  t.is(silent, '');
});

/** Point the first L2 entry of `file` 1 TiB past the end of the file. */
async function corruptFirstL2Entry(file: string): Promise<void> {
  const handle = await openFile(file, 'r+');
  try {
    const read = async (offset: number) => {
      const buf = Buffer.alloc(8);
      await handle.read(buf, 0, 8, offset);
      return buf.readBigUInt64BE(0);
    };
    const offsetMask = 0x00fffffffffffe00n;
    const l1 = Number(await read(40));
    const l2 = Number((await read(l1)) & offsetMask);
    const entry = ((await read(l2)) & ~offsetMask) | (1n << 40n);
    const buf = Buffer.alloc(8);
    buf.writeBigUInt64BE(entry, 0);
    await handle.write(buf, 0, 8, l2);
  } finally {
    await handle.close();
  }
}

test('a corrupt image fails cleanly in convert, compare and map', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'bad.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', file, '4M');
  await qemuIo('-c', 'write -P 1 0 64k', file);
  await corruptFirstL2Entry(file);
  const converted = await qcow2Cli('convert', '-O', 'raw', file, path.join(dir, 'out.raw'));
  t.is(converted.code, 1);
  t.regex(converted.stderr, /^qcow2: .*1099511627776/m);
  const compared = await qcow2Cli('compare', file, file);
  t.true([3, 4].includes(compared.code), `compare exit code ${compared.code}`);
  t.is(compared.stdout, '');
  const mapped = await qcow2Cli('map', '--output=json', file);
  t.is(mapped.code, 1);
  t.regex(mapped.stderr, /^qcow2: /m);
});
