/**
 * `qcow2 snapshot` against `qemu-img snapshot` on twin images: the same output and exit codes, and
 * after every step our image checks clean and reads (active layer and every snapshot) like qemu's.
 */
import { copyFile, open as fsOpen, readFile } from 'node:fs/promises';
import path from 'node:path';

import test, { ExecutionContext } from 'ava';

import { ErrorCodes, Qcow2Image, applySnapshot, createSnapshot, deleteSnapshot, listSnapshots, nextSnapshotId, open } from '../ts/index.js';
import { patternBytes, qcow2Cli, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';
import { runIn, runTwin, twinDirs } from './helpers/twin.js';

type Dirs = { theirs: string; ours: string };

/** A step of a scenario: a snapshot command run by both tools, or qemu-io commands run on both images. */
type Step = { snapshot: string[] } | { io: string[] } | { resize: string };

/** The snapshot list with the creation times masked (the two tools take them a moment apart). */
function maskDates(text: string): string {
  return text.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'YYYY-MM-DD hh:mm:ss');
}

/** The IDs of the snapshots qemu-img lists. */
async function snapshotIds(file: string): Promise<string[]> {
  const info = JSON.parse(await qemuImg('info', '--output=json', file)) as { snapshots?: { id: string }[] };
  return (info.snapshots ?? []).map((s) => s.id);
}

/** Our image checks clean; its active layer and every snapshot read like qemu's twin. */
async function sameState(t: ExecutionContext, dirs: Dirs, name: string, label: string): Promise<void> {
  const [ours, theirs] = [path.join(dirs.ours, name), path.join(dirs.theirs, name)];
  const check = await runProgram('qemu-img', ['check', ours]);
  t.is(check.code, 0, `check exit code after ${label}: ${check.stdout}${check.stderr}`);
  t.regex(check.stdout, /No errors were found on the image/, `check after ${label}`);
  const compare = await runProgram('qemu-img', ['compare', ours, theirs]);
  t.regex(compare.stdout, /Images are identical/, `active layer after ${label}: ${compare.stdout}${compare.stderr}`);
  const ids = await snapshotIds(ours);
  t.deepEqual(ids, await snapshotIds(theirs), `snapshot IDs after ${label}`);
  for (const id of ids) {
    const raws = [`${ours}.${id}.raw`, `${theirs}.${id}.raw`];
    await qemuImg('convert', '-l', `snapshot.id=${id}`, '-O', 'raw', ours, raws[0]);
    await qemuImg('convert', '-l', `snapshot.id=${id}`, '-O', 'raw', theirs, raws[1]);
    t.true((await readFile(raws[0])).equals(await readFile(raws[1])), `snapshot ${id} after ${label}`);
  }
}

/** Make `name` in both folders with `create` options, then run the steps, comparing after each. */
async function scenario(t: ExecutionContext, name: string, create: string[], size: string, steps: Step[]): Promise<void> {
  const dirs = await twinDirs(await tempDir(t));
  for (const dir of [dirs.theirs, dirs.ours]) await qemuImg('create', '-q', '-f', 'qcow2', ...create, path.join(dir, name), size);
  for (const step of steps) {
    if ('io' in step) {
      const args = step.io.flatMap((c) => ['-c', c]);
      for (const dir of [dirs.theirs, dirs.ours]) await qemuIo('-f', 'qcow2', ...args, path.join(dir, name));
      continue;
    }
    if ('resize' in step) {
      for (const dir of [dirs.theirs, dirs.ours]) await qemuImg('resize', '-q', '--shrink', '-f', 'qcow2', path.join(dir, name), step.resize);
      await sameState(t, dirs, name, `resize ${step.resize}`);
      continue;
    }
    const args = ['snapshot', ...step.snapshot, name];
    const { theirs, ours } = await runTwin(dirs, args);
    const label = args.join(' ');
    t.is(maskDates(ours.stdout), maskDates(theirs.stdout), `stdout of ${label}`);
    t.is(ours.stderr, theirs.stderr, `stderr of ${label}`);
    t.is(ours.code, theirs.code, `exit code of ${label}`);
    await sameState(t, dirs, name, label);
  }
}

test('create, list, apply and delete like qemu-img snapshot; writes after a snapshot copy on write', async (t) => {
  await scenario(t, 'a.qcow2', [], '4M', [
    { io: ['write -P 1 0 1M', 'write -P 2 3M 64k'] },
    { snapshot: ['-l'] },
    { snapshot: ['-c', 'first'] },
    { io: ['write -P 3 512k 1M', 'write -P 4 3M 4k'] },
    { snapshot: ['-c', 'second'] },
    { snapshot: ['-c', 'second'] },
    { io: ['write -z 0 256k', 'discard 1M 64k'] },
    { snapshot: ['-l'] },
    { snapshot: ['-a', 'first'] },
    { io: ['write -P 5 64k 64k'] },
    { snapshot: ['-a', '3'] },
    { snapshot: ['-d', 'second'] },
    { snapshot: ['-d', '1'] },
    { snapshot: ['-a', 'nope'] },
    { snapshot: ['-d', 'nope'] },
    { snapshot: ['-q', '-l'] },
    { snapshot: ['-d', 'first'] },
    { io: ['write -P 6 0 2M'] },
    { snapshot: ['-d', 'second'] },
    { snapshot: ['-l'] },
  ]);
});

test('refcount widths 1 to 64: the snapshots each width can hold, and the overflow qemu reports', async (t) => {
  for (const bits of ['1', '2', '4', '8', '32', '64']) {
    await scenario(t, `r${bits}.qcow2`, ['-o', `refcount_bits=${bits},cluster_size=4096`], '1M', [
      { io: ['write -P 1 0 64k', 'write -P 2 512k 8k'] },
      ...(bits === '1' ? [] : [{ snapshot: ['-c', 'a'] }, { io: ['write -P 3 4k 8k'] }, { snapshot: ['-c', 'b'] }]),
      ...(bits === '2' ? [{ snapshot: ['-c', 'c'] }] : []),
      ...(bits === '1' ? [] : [{ snapshot: ['-d', 'a'] }, { snapshot: ['-a', 'b'] }]),
    ]);
  }
});

test('refcount overflow (1-bit refcounts): qemu-img\'s message and exit code; our image stays clean', async (t) => {
  const dirs = await twinDirs(await tempDir(t));
  for (const dir of [dirs.theirs, dirs.ours]) {
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=1', path.join(dir, 'o.qcow2'), '1M');
    await qemuIo('-c', 'write -P 1 0 128k', path.join(dir, 'o.qcow2'));
  }
  const { theirs, ours } = await runTwin(dirs, ['snapshot', '-c', 'x', 'o.qcow2']);
  t.is(ours.stderr, theirs.stderr);
  t.is(ours.code, 1);
  t.is(theirs.code, 1);
  // qemu leaks a cluster here; we change nothing before the refcounts are known to fit.
  t.regex(await qemuImg('check', path.join(dirs.ours, 'o.qcow2')), /No errors were found/);
  t.deepEqual(await snapshotIds(path.join(dirs.ours, 'o.qcow2')), []);
});

test('extended L2 entries: subclusters written before and after a snapshot', async (t) => {
  await scenario(t, 'x.qcow2', ['-o', 'extended_l2=on,cluster_size=64k'], '4M', [
    { io: ['write -P 1 0 4k', 'write -P 2 70k 6k', 'write -z 200k 8k'] },
    { snapshot: ['-c', 's'] },
    { io: ['write -P 3 2k 4k', 'write -P 4 66k 64k'] },
    { snapshot: ['-c', 't'] },
    { snapshot: ['-a', 's'] },
    { io: ['write -P 5 8k 2k'] },
    { snapshot: ['-d', 's'] },
    { snapshot: ['-d', 't'] },
  ]);
});

test('compressed clusters: snapshot, overwrite (copy on write), apply, delete', async (t) => {
  const dirs = await twinDirs(await tempDir(t));
  const raw = path.join(dirs.theirs, 'src.raw');
  await qemuImg('create', '-q', '-f', 'raw', raw, '2M');
  await qemuIo('-f', 'raw', '-c', 'write -P 7 0 1M', '-c', 'write -P 9 1536k 64k', raw);
  await qemuImg('convert', '-c', '-O', 'qcow2', raw, path.join(dirs.theirs, 'c.qcow2'));
  await copyFile(path.join(dirs.theirs, 'c.qcow2'), path.join(dirs.ours, 'c.qcow2'));
  const steps: Step[] = [
    { snapshot: ['-c', 'packed'] },
    { io: ['write -P 1 0 96k', 'write -P 2 1536k 4k'] },
    { snapshot: ['-c', 'after'] },
    { snapshot: ['-a', 'packed'] },
    { snapshot: ['-d', 'packed'] },
    { snapshot: ['-a', 'after'] },
    { snapshot: ['-d', 'after'] },
  ];
  for (const step of steps) {
    if ('io' in step) {
      for (const dir of [dirs.theirs, dirs.ours]) await qemuIo('-f', 'qcow2', ...step.io.flatMap((c) => ['-c', c]), path.join(dir, 'c.qcow2'));
      continue;
    }
    if (!('snapshot' in step)) continue;
    const { theirs, ours } = await runTwin(dirs, ['snapshot', ...step.snapshot, 'c.qcow2']);
    t.is(ours.code, theirs.code, step.snapshot.join(' '));
    await sameState(t, dirs, 'c.qcow2', step.snapshot.join(' '));
  }
});

test('apply restores the virtual size the snapshot was taken at (grown and shrunk since)', async (t) => {
  await scenario(t, 's.qcow2', ['-o', 'cluster_size=512'], '1M', [
    { io: ['write -P 1 0 64k', 'write -P 2 1000k 24k'] },
    { snapshot: ['-c', 'small'] },
    { resize: '40M' },
    { io: ['write -P 3 20M 64k'] },
    { snapshot: ['-c', 'big'] },
    { snapshot: ['-a', 'small'] },
    { io: ['write -P 4 512k 4k'] },
    { snapshot: ['-a', 'big'] },
    { snapshot: ['-d', 'small'] },
    { snapshot: ['-d', 'big'] },
  ]);
});

test('persistent bitmaps stay valid through create and delete; apply is refused as qemu-img refuses it', async (t) => {
  const dirs = await twinDirs(await tempDir(t));
  for (const dir of [dirs.theirs, dirs.ours]) {
    const file = path.join(dir, 'bm.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', file, '4M');
    await qemuIo('-c', 'write -P 1 0 1M', file);
    await qemuImg('bitmap', '--add', file, 'b0');
  }
  for (const args of [['-c', 's'], ['-a', 's'], ['-a', 'nope'], ['-c', 't'], ['-d', 's'], ['-l']]) {
    const { theirs, ours } = await runTwin(dirs, ['snapshot', ...args, 'bm.qcow2']);
    t.is(maskDates(ours.stdout), maskDates(theirs.stdout), args.join(' '));
    t.is(ours.stderr, theirs.stderr, args.join(' '));
    t.is(ours.code, theirs.code, args.join(' '));
    await sameState(t, dirs, 'bm.qcow2', args.join(' '));
  }
  const [ours, theirs] = await Promise.all([dirs.ours, dirs.theirs].map((d) => runProgram('qemu-img', ['info', path.join(d, 'bm.qcow2')])));
  t.is(ours.stderr, '');
  t.is(maskDates(ours.stdout).replace(/disk size: .*\n/, ''), maskDates(theirs.stdout).replace(/disk size: .*\n/, '').replaceAll('theirs', 'ours'));
});

test('snapshots qemu-img made are listed, applied and deleted by ours, and ours by qemu-img', async (t) => {
  const dir = await tempDir(t);
  const [mine, theirs] = [path.join(dir, 'mine.qcow2'), path.join(dir, 'theirs.qcow2')];
  for (const file of [mine, theirs]) {
    await qemuImg('create', '-q', '-f', 'qcow2', file, '2M');
    await qemuIo('-c', 'write -P 1 0 512k', file);
  }
  await qemuImg('snapshot', '-c', 'q1', theirs);
  t.is((await qcow2Cli('snapshot', '-c', 'o1', mine)).code, 0);
  for (const file of [mine, theirs]) await qemuIo('-c', 'write -P 2 0 128k', file);
  await qemuImg('snapshot', '-c', 'q2', mine);
  t.is((await qcow2Cli('snapshot', '-c', 'o2', theirs)).code, 0);
  const listed = await qcow2Cli('snapshot', '-l', theirs);
  t.is(listed.stdout, await qemuImg('snapshot', '-l', theirs));
  t.is((await qcow2Cli('snapshot', '-l', mine)).stdout, await qemuImg('snapshot', '-l', mine));
  t.is((await qcow2Cli('snapshot', '-a', 'q1', theirs)).code, 0);
  await qemuImg('snapshot', '-a', 'o1', mine);
  for (const file of [mine, theirs]) {
    await qemuIo('-c', 'read -P 1 0 512k', file);
    t.regex(await qemuImg('check', file), /No errors were found/);
  }
  t.is((await qcow2Cli('snapshot', '-d', 'q1', theirs)).code, 0);
  await qemuImg('snapshot', '-d', 'o1', mine);
  t.is((await qcow2Cli('snapshot', '-d', 'q2', mine)).code, 0);
  await qemuImg('snapshot', '-d', 'o2', theirs);
  for (const file of [mine, theirs]) {
    t.regex(await qemuImg('check', file), /No errors were found/);
    t.deepEqual(await snapshotIds(file), []);
    await qemuIo('-c', 'read -P 1 0 512k', file);
  }
});

test('a snapshot whose L1 table points past the file is refused before anything changes', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'h.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', file, '4M');
  await qemuIo('-c', 'write -P 1 0 1M', file);
  await qemuImg('snapshot', '-c', 's', file);
  const [snapshot] = await listSnapshots(file);
  const handle = await fsOpen(file, 'r+');
  const entry = Buffer.alloc(8);
  entry.writeBigUInt64BE(0x00fffffffff00000n);
  await handle.write(entry, 0, 8, snapshot.l1TableOffset);
  await handle.close();
  const before = await readFile(file);
  for (const action of [['-d', 's'], ['-a', 's']]) {
    const result = await qcow2Cli('snapshot', ...action, file);
    t.is(result.code, 1);
    t.regex(result.stderr, new RegExp(`^qcow2: Could not ${action[0] === '-d' ? 'delete' : 'apply'} snapshot 's': the L1 table at ${snapshot.l1TableOffset} \\(1 entries\\) cannot be walked: ERROR`));
    t.true((await readFile(file)).equals(before), `${action.join(' ')} left the file as it was`);
  }
  await t.throwsAsync(deleteSnapshot(file, 's'), { code: ErrorCodes.CORRUPT });
});

test('usage and open errors like qemu-img snapshot', async (t) => {
  const dirs = await twinDirs(await tempDir(t));
  for (const dir of [dirs.theirs, dirs.ours]) {
    await qemuImg('create', '-q', '-f', 'qcow2', path.join(dir, 'e.qcow2'), '1M');
    await qemuImg('create', '-q', '-f', 'raw', path.join(dir, 'r.raw'), '1M');
  }
  const cases = [
    ['snapshot', '-U', '-c', 'x', 'e.qcow2'],
    ['snapshot', '-U', '-l', 'e.qcow2'],
    ['snapshot', '-l', '-c', 'x', 'e.qcow2'],
    ['snapshot', '-c', 'x', '-c', 'y', 'e.qcow2'],
    ['snapshot', '-c', 'x'],
    ['snapshot', '-c', 'x', 'e.qcow2', 'e.qcow2'],
    ['snapshot', '-x', 'e.qcow2'],
    ['snapshot', '-c'],
    ['snapshot', 'e.qcow2'],
    ['snapshot', '-c', 'x', 'missing.qcow2'],
    ['snapshot', '-c', 'x', 'r.raw'],
    ['snapshot', '-l', 'r.raw'],
    ['snapshot', 'r.raw'],
    ['snapshot', '-U', 'e.qcow2'],
  ];
  for (const args of cases) {
    const { theirs, ours } = await runTwin(dirs, args);
    const label = args.join(' ');
    t.is(ours.stdout, theirs.stdout, `stdout of ${label}`);
    t.is(ours.stderr, theirs.stderr, `stderr of ${label}`);
    t.is(ours.code, theirs.code, `exit code of ${label}`);
  }
  t.regex(await qemuImg('check', path.join(dirs.ours, 'e.qcow2')), /No errors were found/);
});

test('library: snapshots of an image kept open, which writes on copy on write', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'lib.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', file, '8M');
  const image = (await open(file)) as Qcow2Image;
  const before = patternBytes(1 << 20, 1);
  await image.write(before, 0);
  const first = await createSnapshot(image, 'one');
  t.like(first, { id: '1', name: 'one', diskSize: 8 << 20, vmStateSize: 0 });
  await image.write(patternBytes(256 << 10, 2), 128 << 10);
  await createSnapshot(image, 'two');
  t.deepEqual((await listSnapshots(image)).map((s) => [s.id, s.name]), [['1', 'one'], ['2', 'two']]);
  await applySnapshot(image, 'one');
  const read = Buffer.alloc(1 << 20);
  await image.read(read, 0);
  t.true(read.equals(before));
  await image.write(patternBytes(64 << 10, 3), 0);
  await deleteSnapshot(image, 'one');
  await t.throwsAsync(applySnapshot(image, 'one'), { code: 'ENOENT' });
  await t.throwsAsync(deleteSnapshot(image, '2'), { code: 'ENOENT' });
  await image.close();
  t.regex(await qemuImg('check', file), /No errors were found/);
  await qemuIo('-c', `read -P 0 ${1 << 20} ${7 << 20}`, file);
  t.deepEqual((await listSnapshots(file)).map((s) => s.name), ['two']);
  const readOnly = await open(file, { readOnly: true });
  await t.throwsAsync(createSnapshot(readOnly, 'x'), { code: ErrorCodes.READ_ONLY });
  await readOnly.close();
  t.is(nextSnapshotId([{ id: '7' }, { id: 'x' }, { id: '10abc' }] as never), '11');
});

test('our snapshot table entries hold what qemu-img writes (IDs, sizes, extra data)', async (t) => {
  const dirs = await twinDirs(await tempDir(t));
  for (const dir of [dirs.theirs, dirs.ours]) await qemuImg('create', '-q', '-f', 'qcow2', path.join(dir, 'b.qcow2'), '3M');
  await runIn(dirs.theirs, 'qemu-img', ['snapshot', '-c', 'n', 'b.qcow2']);
  await qcow2Cli('snapshot', '-c', 'n', path.join(dirs.ours, 'b.qcow2'));
  const [ours, theirs] = await Promise.all([listSnapshots(path.join(dirs.ours, 'b.qcow2')), listSnapshots(path.join(dirs.theirs, 'b.qcow2'))]);
  const strip = (e: (typeof ours)[0]) => ({ ...e, entryOffset: 0, l1TableOffset: 0, dateSec: 0, dateNsec: 0 });
  t.deepEqual(ours.map(strip), theirs.map(strip));
  t.true(Math.abs(ours[0].dateSec - theirs[0].dateSec) < 60);
  t.is(ours[0].dateNsec % 1000, 0);
});
