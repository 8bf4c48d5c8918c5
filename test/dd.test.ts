/** `qcow2 dd` against `qemu-img dd`: the same messages and exit codes, outputs of the same size and contents. */
import { readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes, dd, open, planDd } from '../ts/index.js';
import { patternBytes, qemuImg, qemuIo, tempDir } from './helpers/qemu.js';
import { runTwin, twinDirs } from './helpers/twin.js';

type Dirs = { theirs: string; ours: string };

/** The output a dd command line writes (of=…), and its format (-O …). */
function outputOf(args: string[]): { name?: string; format: string } {
  const of = args.find((a) => a.startsWith('of='));
  const o = args.indexOf('-O');
  return { name: of?.slice(3) || undefined, format: o >= 0 ? args[o + 1] : 'raw' };
}

/** The virtual size qemu-img reports. */
async function virtualSize(file: string, format: string): Promise<number> {
  return (JSON.parse(await qemuImg('info', '-f', format, '--output=json', file)) as { 'virtual-size': number })['virtual-size'];
}

/**
 * Run `dd ARGS` with both tools, each in its folder; messages and exit codes must agree, and
 * when qemu-img wrote an output, ours must have its size and contents (and pass qemu-img check).
 */
async function ddBoth(t: ExecutionContext, dirs: Dirs, args: string[]): Promise<void> {
  const { theirs, ours } = await runTwin(dirs, ['dd', ...args]);
  const label = `dd ${args.join(' ')}`;
  t.is(ours.stdout, theirs.stdout, `stdout of ${label}`);
  t.is(ours.stderr, theirs.stderr, `stderr of ${label}`);
  t.is(ours.code, theirs.code, `exit code of ${label}`);
  const { name, format } = outputOf(args);
  if (theirs.code !== 0 || name === undefined) return;
  const [a, b] = [path.join(dirs.ours, name), path.join(dirs.theirs, name)];
  t.is(await virtualSize(a, format), await virtualSize(b, format), `size after ${label}`);
  const compare = await qemuImg('compare', '-f', format, '-F', format, a, b).catch((error: Error) => error.message);
  t.regex(compare, /Images are identical/, `content after ${label}`);
  if (format === 'qcow2') t.regex(await qemuImg('check', a), /No errors were found/, `check after ${label}`);
}

/** Run the cases one after the other (they write the same output names), in two interleaved groups. */
async function ddAll(t: ExecutionContext, root: string, cases: string[][]): Promise<void> {
  const groups = [cases.filter((_, i) => i % 2 === 0), cases.filter((_, i) => i % 2 === 1)];
  await Promise.all(
    groups.map(async (group, g) => {
      const dirs = await twinDirs(path.join(root, `g${g}`));
      for (const args of group) await ddBoth(t, dirs, args);
    }),
  );
}

/** Input images (absolute paths, shared by both tools): raw of an odd size, raw with holes, qcow2 with a backing chain. */
async function makeInputs(dir: string): Promise<Record<string, string>> {
  const at = (name: string) => path.join(dir, name);
  await writeFile(at('odd.raw'), patternBytes(10000, 1));
  await qemuImg('create', '-q', '-f', 'raw', at('holes.raw'), '3M');
  await qemuIo('-f', 'raw', '-c', 'write -P 2 100k 5k', '-c', 'write -P 3 2M 300k', at('holes.raw'));
  await qemuImg('create', '-q', '-f', 'qcow2', at('base.qcow2'), '20M');
  await qemuIo('-c', 'write -P 4 0 2M', '-c', 'write -P 5 10M 100k', '-c', 'write -c -P 6 12M 256k', at('base.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', at('base.qcow2'), '-F', 'qcow2', '-o', 'cluster_size=16k', at('top.qcow2'), '24M');
  await qemuIo('-c', 'write -P 7 1M 2M', '-c', 'write -z 10M 64k', '-c', 'write -P 8 23M 1k', at('top.qcow2'));
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', at('ext.qcow2'), '5M');
  await qemuIo('-c', 'write -P 9 4k 4k', '-c', 'write -z 1M 4k', '-c', 'write -P 10 2M 100k', at('ext.qcow2'));
  return { odd: at('odd.raw'), holes: at('holes.raw'), top: at('top.qcow2'), ext: at('ext.qcow2'), base: at('base.qcow2') };
}

test('copies like qemu-img dd: bs, count and skip over raw and qcow2 inputs, raw and qcow2 outputs', async (t) => {
  const root = await tempDir(t);
  const inputs = await makeInputs(path.join(root, ''));
  const cases: string[][] = [];
  for (const output of [['of=out.raw'], ['-O', 'qcow2', 'of=out.qcow2']]) {
    const odd = [`if=${inputs.odd}`, ...output];
    cases.push(
      odd,
      ['bs=4k', 'count=2', 'skip=1', ...odd],
      ['bs=512', 'count=4', 'skip=2', ...odd],
      ['bs=1000', 'count=3', ...odd],
      ['bs=1000', 'skip=3', ...odd],
      ['bs=1.5k', ...odd],
      ['count=1k', ...odd],
      ['count=0', ...odd],
      ['bs=1k', 'skip=100', ...odd],
      ['skip=1E', ...odd],
      ['bs=0x10k', ...odd],
      ['-f', 'raw', 'bs=1M', `if=${inputs.holes}`, ...output],
      ['bs=64k', 'skip=2', 'count=40', `if=${inputs.holes}`, ...output],
      ['-U', 'bs=1M', 'skip=1', `if=${inputs.top}`, ...output],
      ['bs=3000', 'skip=7', 'count=5000', `if=${inputs.top}`, ...output],
      ['bs=64k', 'count=200', '-f', 'qcow2', `if=${inputs.base}`, ...output],
      ['bs=4k', 'skip=1', `if=${inputs.ext}`, ...output],
    );
  }
  await ddAll(t, root, cases);
});

test('bad operands and options: the same messages and exit codes as qemu-img dd', async (t) => {
  const root = await tempDir(t);
  const input = path.join(root, 'in.raw');
  await writeFile(input, patternBytes(4096, 2));
  const cases = [
    [],
    ['foo', `if=${input}`, 'of=x'],
    ['foo=1', `if=${input}`, 'of=x'],
    ['=3', `if=${input}`, 'of=x'],
    [`if=${input}`],
    ['of=x'],
    ['bs=0', `if=${input}`, 'of=x'],
    ['bs=', `if=${input}`, 'of=x'],
    ['bs=abc', `if=${input}`, 'of=x'],
    ['bs=3G', `if=${input}`, 'of=x'],
    ['count=-1', `if=${input}`, 'of=x'],
    ['count=8E', `if=${input}`, 'of=x'],
    ['skip=x', `if=${input}`, 'of=x'],
    ['skip=8E', `if=${input}`, 'of=x'],
    ['if=missing.raw', 'of=x'],
    ['-f', 'qcow2', `if=${input}`, 'of=x'],
    ['-f', 'nonsense', `if=${input}`, 'of=x'],
    ['-O', 'nonsense', `if=${input}`, 'of=x'],
    ['-O', 'null-co', `if=${input}`, 'of=x'],
    [`if=${input}`, 'of='],
    [`if=${input}`, 'of=missing-dir/x'],
    ['-x', `if=${input}`, 'of=x'],
    ['--nonsense', `if=${input}`, 'of=x'],
    ['-f'],
  ];
  await ddAll(t, root, cases);
});

test('library: planDd follows qemu-img dd, dd copies from an open image and warns past the end', async (t) => {
  t.deepEqual(planDd(10240, { blockSize: 512, count: 4, skip: 2 }), { start: 1024, length: 1024, outputSize: 1024, skippedPastEnd: false });
  t.deepEqual(planDd(10240, { blockSize: 1000, skip: 3 }), { start: 3000, length: 7240, outputSize: 7680, skippedPastEnd: false });
  t.deepEqual(planDd(10240, { skip: 2n ** 62n }), { start: 10240, length: 0, outputSize: 0, skippedPastEnd: true });
  t.throws(() => planDd(1, { blockSize: 0 }), { code: ErrorCodes.INVALID_ARGUMENT });
  t.throws(() => planDd(1, { count: -1 }), { code: ErrorCodes.INVALID_ARGUMENT });
  const dir = await tempDir(t);
  const input = path.join(dir, 'in.raw');
  const data = patternBytes(8192, 3);
  await writeFile(input, data);
  const image = await open(input, { readOnly: true });
  const warnings: string[] = [];
  try {
    await dd(image, path.join(dir, 'out.qcow2'), { outputFormat: 'qcow2', blockSize: 1024, skip: 2, count: 6 });
    await dd(image, path.join(dir, 'empty.raw'), { skip: 100, onWarning: (w) => warnings.push(w) });
  } finally {
    await image.close();
  }
  await qemuImg('convert', '-O', 'raw', path.join(dir, 'out.qcow2'), path.join(dir, 'out.raw'));
  t.deepEqual(await readFile(path.join(dir, 'out.raw')), data.subarray(2048, 6144));
  t.is((await stat(path.join(dir, 'empty.raw'))).size, 0);
  t.deepEqual(warnings, [`${input}: cannot skip to specified offset`]);
  await t.throwsAsync(dd(input, input), { message: /Failed to get "write" lock/ });
  t.deepEqual(await readFile(input), data);
});
