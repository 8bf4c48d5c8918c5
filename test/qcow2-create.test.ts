/** createQcow2: every option and refcount width gives an image qemu-img checks clean and describes like its own. */
import path from 'node:path';

import test from 'ava';

import { ErrorCodes, Qcow2Error, openQcow2 } from '../ts/index.js';
import { createQcow2, Qcow2CreateOptions } from '../ts/qcow2/create.js';
import { qemuImg, runProgram, tempDir } from './helpers/qemu.js';
import { qemuCreateArgs } from './helpers/create-args.js';

/** qemu-img info --output=json without what differs between any two files. */
async function describe(file: string): Promise<unknown> {
  const info = JSON.parse(await qemuImg('info', '--output=json', file)) as Record<string, unknown>;
  for (const key of ['filename', 'actual-size', 'dirty-flag', 'backing-filename', 'full-backing-filename']) delete info[key];
  const specific = info['format-specific'] as { data: Record<string, unknown> } | undefined;
  if (specific?.data['data-file']) specific.data['data-file'] = 'DATA';
  return info;
}

const MiB = 1 << 20;
const CASES: { name: string; size: number; options: Omit<Qcow2CreateOptions, 'size'>; base?: boolean; dataFile?: boolean }[] = [
  { name: 'defaults', size: 64 * MiB, options: {} },
  { name: 'empty disk', size: 0, options: {} },
  { name: 'compat 0.10', size: 64 * MiB, options: { compat: '0.10' } },
  ...[1, 2, 4, 8, 16, 32, 64].map((bits) => ({ name: `refcount_bits=${bits}`, size: 64 * MiB, options: { refcountBits: bits } })),
  { name: '512-byte clusters', size: 16 * MiB, options: { clusterSize: 512 } },
  { name: '2 MiB clusters', size: 256 * MiB, options: { clusterSize: 2 * MiB } },
  { name: 'extended L2', size: 64 * MiB, options: { extendedL2: true } },
  { name: 'lazy refcounts', size: 64 * MiB, options: { lazyRefcounts: true } },
  { name: 'zstd', size: 64 * MiB, options: { compressionType: 'zstd' } },
  { name: 'backing file', size: 64 * MiB, options: { backingFile: 'base.qcow2', backingFormat: 'qcow2' }, base: true },
  { name: 'raw backing file', size: 64 * MiB, options: { backingFile: 'base.qcow2', backingFormat: 'raw' }, base: true },
  { name: 'external data file', size: 64 * MiB, options: {}, dataFile: true },
  { name: 'external raw data file', size: 64 * MiB, options: { dataFileRaw: true }, dataFile: true },
  { name: 'preallocation=metadata', size: 64 * MiB, options: { preallocation: 'metadata' } },
  { name: 'preallocation=falloc', size: 8 * MiB, options: { preallocation: 'falloc' } },
  { name: 'preallocation=full', size: 8 * MiB, options: { preallocation: 'full' } },
  { name: 'preallocation=metadata, refcount_bits=1, 512-byte clusters', size: 8 * MiB, options: { preallocation: 'metadata', refcountBits: 1, clusterSize: 512 } },
  { name: 'preallocation=metadata with extended L2 over a backing file', size: 8 * MiB, options: { preallocation: 'metadata', extendedL2: true, backingFile: 'base.qcow2', backingFormat: 'qcow2' }, base: true },
  { name: 'external data file, preallocation=full', size: 8 * MiB, options: { preallocation: 'full' }, dataFile: true },
];

for (const c of CASES) {
  test(`createQcow2 matches qemu-img create: ${c.name}`, async (t) => {
    const dir = await tempDir(t);
    if (c.base) await qemuImg('create', '-q', '-f', 'qcow2', path.join(dir, 'base.qcow2'), String(c.size));
    const ours = path.join(dir, 'ours.qcow2');
    const theirs = path.join(dir, 'theirs.qcow2');
    const oursOptions = { ...c.options, ...(c.dataFile ? { dataFile: path.join(dir, 'ours.data') } : {}) };
    const theirsOptions = { ...c.options, size: c.size, ...(c.dataFile ? { dataFile: path.join(dir, 'theirs.data') } : {}) };
    await createQcow2(ours, { size: c.size, ...oursOptions });
    const created = await runProgram('qemu-img', ['create', '-q', '-f', 'qcow2', ...qemuCreateArgs(theirsOptions), theirs, String(c.size)], {});
    t.is(created.code, 0, created.stderr);
    t.deepEqual(await describe(ours), await describe(theirs));
    const check = await runProgram('qemu-img', ['check', '--output=json', ours]);
    t.is(check.code, 0, check.stdout + check.stderr);
    const report = JSON.parse(check.stdout) as Record<string, number>;
    t.is(report.corruptions ?? 0, 0);
    t.is(report.leaks ?? 0, 0);
    // The new image opens and takes a write at its last byte.
    if (c.size > 0) {
      const image = await openQcow2(ours, { followFileNames: true });
      try {
        await image.write(Buffer.from([0x5a]), c.size - 1);
      } finally {
        await image.close();
      }
      const after = JSON.parse((await runProgram('qemu-img', ['check', '--output=json', ours])).stdout) as Record<string, number>;
      t.is((after.corruptions ?? 0) + (after.leaks ?? 0), 0);
    }
  });
}

test('createQcow2 refuses what qemu-img refuses, with its wording', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'x.qcow2');
  const refused: [Qcow2CreateOptions, RegExp][] = [
    [{ size: MiB, compat: '0.10', lazyRefcounts: true }, /Lazy refcounts only supported with compatibility level 1.1/],
    [{ size: MiB, compat: '0.10', refcountBits: 8 }, /Different refcount widths than 16 bits/],
    [{ size: MiB, compat: '0.10', extendedL2: true }, /Extended L2 entries are only supported with compatibility level 1.1/],
    [{ size: MiB, compat: '0.10', compressionType: 'zstd' }, /Non-zlib compression type/],
    [{ size: MiB, compat: '0.10', dataFile: 'd' }, /External data files are only supported/],
    [{ size: MiB, extendedL2: true, clusterSize: 4096 }, /at least 16384 bytes/],
    [{ size: MiB, dataFileRaw: true }, /data-file-raw requires data-file/],
    [{ size: MiB, backingFile: 'b', preallocation: 'metadata' }, /only be used at the same time if extended_l2 is on/],
    [{ size: MiB, refcountBits: 3 }, /Refcount width must be a power of two and may not exceed 64 bits, got 3/],
    [{ size: MiB, clusterSize: 3000 }, /Cluster size must be a power of two between 512 and 2048k, got 3000/],
    [{ size: -1 }, /size must be a non-negative integer, got -1/],
  ];
  for (const [options, message] of refused) {
    const error = await t.throwsAsync<Qcow2Error>(createQcow2(file, options));
    t.is(error?.code, ErrorCodes.INVALID_ARGUMENT);
    t.regex(error?.message ?? '', message);
  }
});
