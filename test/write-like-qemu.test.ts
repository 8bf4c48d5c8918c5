/**
 * Writes that leave the same mapping as QEMU's: partial writes with extended L2 entries allocate
 * only the subclusters they touch, zero writes leave clusters unallocated or zero where qemu does
 * (compat=0.10 without a backing file included). The same seeded commands run through `qcow2 io`
 * and qemu-io on twin images; qemu-io's `map` and `alloc` then print the same, and so does
 * `qemu-img map` up to host offsets and holes in the host file.
 */
import { copyFile } from 'node:fs/promises';
import path from 'node:path';

import test from 'ava';

import { qcow2Cli, qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';
import { random } from './helpers/random.js';

const SIZE = 1 << 20;

/** qemu-io commands: small unaligned writes, zero writes of 512-byte multiples with and without -u, across clusters too. */
function commands(seed: number, count: number): string[] {
  const rnd = random(seed);
  const int = (n: number) => Math.floor(rnd() * n);
  const out: string[] = [];
  for (let i = 0; i < count; i++) {
    const long = rnd() < 0.25;
    if (rnd() < 0.55) {
      const offset = int(SIZE - 1);
      const length = Math.min(SIZE - offset, 1 + int(long ? 200_000 : 9000));
      out.push(`write -P ${1 + int(254)} ${offset} ${length}`);
    } else {
      const offset = int(SIZE / 512) * 512;
      const length = Math.min(SIZE - offset, 512 * (1 + int(long ? 400 : 20)));
      out.push(`write -z${rnd() < 0.5 ? ' -u' : ''} ${offset} ${length}`);
    }
  }
  return out;
}

/**
 * `qemu-img map --output=json` without host offsets (allocation order may differ) and with data
 * runs counted as data where the host file has holes (qemu zero-fills fresh clusters by fallocate,
 * we leave them sparse), adjacent equal runs merged.
 */
async function normalizedMap(file: string): Promise<string[]> {
  const runs = JSON.parse(await qemuImg('map', '--output=json', file)) as Record<string, unknown>[];
  const out: { start: number; length: number; key: string }[] = [];
  for (const r of runs) {
    const key = `present=${r.present} data=${r.data} zero=${r.data ? false : r.zero} depth=${r.depth}`;
    const last = out[out.length - 1];
    if (last && last.key === key) last.length += r.length as number;
    else out.push({ start: r.start as number, length: r.length as number, key });
  }
  return out.map((r) => `${r.start}+${r.length} ${r.key}`);
}

/** Everything qemu-io and qemu-img say about an image's allocation. */
async function allocation(file: string): Promise<{ io: string; map: string[] }> {
  return { io: await qemuIo('-r', '-c', 'map', '-c', `alloc 0 ${SIZE}`, file), map: await normalizedMap(file) };
}

const CASES = [
  { name: 'compat=0.10', options: 'compat=0.10' },
  { name: 'compat=1.1', options: 'compat=1.1' },
  { name: 'extended L2', options: 'compat=1.1,extended_l2=on' },
  { name: 'extended L2, 32 KiB clusters', options: 'compat=1.1,extended_l2=on,cluster_size=32768' },
];

for (const c of CASES) {
  for (const backed of [false, true]) {
    test(`${c.name}${backed ? ' over a backing file' : ''}: writes and zero writes map as qemu-io's do`, async (t) => {
      const dir = await tempDir(t);
      const ours = path.join(dir, 'ours.qcow2');
      const theirs = path.join(dir, 'theirs.qcow2');
      const create = ['create', '-q', '-f', 'qcow2', '-o', c.options];
      if (backed) {
        const base = path.join(dir, 'base.qcow2');
        await qemuImg('create', '-q', '-f', 'qcow2', base, `${SIZE}`);
        await qemuIo('-c', 'write -P 7 0 300k', '-c', 'write -z 400k 100k', '-c', 'write -P 8 700k 50k', base);
        create.push('-b', 'base.qcow2', '-F', 'qcow2');
      }
      await qemuImg(...create, ours, `${SIZE}`);
      await copyFile(ours, theirs);
      const seed = 1000 + CASES.indexOf(c) * 2 + (backed ? 1 : 0);
      const cmds = commands(seed, 40).flatMap((cmd) => ['-c', cmd]);
      const a = await qcow2Cli('io', ...cmds, ours);
      const b = await runProgram('qemu-io', [...cmds, theirs]);
      t.is(a.code, 0, a.stderr);
      t.is(b.code, 0, b.stderr);
      t.deepEqual(await allocation(ours), await allocation(theirs), `seed ${seed}`);
      await qemuImg('compare', '-q', ours, theirs);
      const check = await runProgram('qemu-img', ['check', ours]);
      t.is(check.code, 0, check.stdout);
      t.regex(check.stdout, /No errors were found on the image/);
    });
  }
}
