/**
 * Crash torture: for every kind of image, a child process runs seeded writes, zero writes,
 * discards, compressed writes and flushes through the library and is killed with SIGKILL at a
 * seeded moment, round after round on the same image. After every kill qemu-img check finds no
 * corruption, our check() counts what it counts, both leak repairs leave the image clean, and
 * every byte a completed flush acknowledged reads back (see test/helpers/torture/). With lazy
 * refcounts, qemu-io crashes too, and our open must rebuild the dirty image it leaves.
 * The long run of the same harness is `npm run torture`.
 */
import os from 'node:os';
import path from 'node:path';

import test from 'ava';

import { open } from '../ts/index.js';
import { qemuImg, qemuIo, runProgram, tempDir } from './helpers/qemu.js';
import { replayCommand, runLane } from './helpers/torture/lane.js';
import { libraryCheck } from './helpers/torture/our-check.js';
import { deriveSeed } from './helpers/torture/random.js';
import { TORTURE_VARIANTS } from './helpers/torture/variants.js';

/** 7 variants × 30 = 210 kills. */
const KILLS_PER_VARIANT = 30;
/** Fixed, so that the operations are the same every run (only the moment each kill lands varies); QCOW2_TORTURE_SEED picks others. */
const SEED = Number(process.env.QCOW2_TORTURE_SEED ?? 20261125);
/** Where a failing round's images are kept for replay. */
const FAILURE_DIR = path.join(os.tmpdir(), 'qcow2-torture-failures');

for (const [index, variant] of TORTURE_VARIANTS.entries()) {
  test(`crash torture: ${KILLS_PER_VARIANT} kills on ${variant.name}`, async (t) => {
    const dir = await tempDir(t);
    const result = await runLane({
      variant,
      seed: deriveSeed(SEED, index),
      kills: KILLS_PER_VARIANT,
      roundsPerImage: 6,
      dir: path.join(dir, 'lane'),
      failureDir: FAILURE_DIR,
      maxRunMs: 200,
      check: libraryCheck,
    });
    if (result.failure) t.fail(`${result.failure}\n  replay: ${replayCommand(result)}`);
    t.is(result.kills, KILLS_PER_VARIANT);
  });
}

// Found by the torture (lazy-refcounts: a rebuilt refcount table lies past a freed hole): the
// first allocation after an open reused a free cluster near the start of the file and "grew"
// the file to that cluster's end plus 64 MiB, cutting off everything past that point.
test('a write into a freed cluster near the start of a large image keeps the rest of the file', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'large.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', file, '80M');
  await qemuIo('-c', 'write -P 7 0 80M', file);
  let image = await open(file);
  await image.discard(0, 1 << 20);
  await image.close();
  image = await open(file);
  await image.write(Buffer.alloc(4096, 9), 0);
  await image.flush();
  await image.close();
  const r = await runProgram('qemu-img', ['check', file]);
  t.is(r.code, 0, r.stdout + r.stderr);
  const tail = Buffer.alloc(4096);
  image = await open(file, { readOnly: true });
  await image.read(tail, (80 << 20) - 4096);
  await image.close();
  t.true(tail.equals(Buffer.alloc(4096, 7)), 'the last 4 KiB of the disk still hold what qemu-io wrote');
});
