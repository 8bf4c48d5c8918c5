/**
 * Property-based fuzzing of the write side: the seed images of fuzz-read get the same mutations,
 * then are opened writable and get seeded writes, zero writes, discards, flushes and resizes
 * (helpers/fuzz-write-case.ts). Never a crash or a hang, every failure a coded Qcow2Error, and an
 * image qemu-img check found clean before is clean after, with every written byte read back by
 * qemu when every request succeeded.
 *
 * Reproduce a failure with the seed and path fast-check prints, or run longer with
 * QCOW2_FUZZ_WRITE_RUNS (cases per seed image) and QCOW2_FUZZ_SEED (or QCOW2_FUZZ_SALT, mixed into the
 * per-image seeds). QCOW2_FUZZ_COLLECT=1 runs every case and reports all failing ones at the end
 * instead of stopping at the first; QCOW2_FUZZ_HANG_MS sets the hang limit.
 */
import { readFile, readdir, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test from 'ava';
import fc from 'fast-check';

import { FuzzChild } from './helpers/fuzz-driver.js';
import { readLayout } from './helpers/fuzz-layout.js';
import { describeMutated, fuzzCaseArbitrary, resolveMutations } from './helpers/fuzz-mutations.js';
import { SEEDS } from './helpers/fuzz-seeds.js';
import { writeOpsArbitrary } from './helpers/fuzz-write-case.js';
import { tempDir } from './helpers/qemu.js';

/** Cases per seed image: each runs qemu-img check twice and qemu-img convert once. */
const RUNS = Number(process.env.QCOW2_FUZZ_WRITE_RUNS ?? 16);
/**
 * A case that takes longer is a hang. Most take well under a second, but a repair that grows a
 * 512-byte-cluster image to a damaged refcount table's 176 GB takes ~10 s (as qemu-img's does).
 */
const HANG_AFTER_MS = Number(process.env.QCOW2_FUZZ_HANG_MS ?? 60_000);
const COLLECT = process.env.QCOW2_FUZZ_COLLECT === '1';

/** A fixed fast-check seed per seed image (or QCOW2_FUZZ_SEED), so that every run tries the same cases. */
function fcSeed(name: string): number {
  if (process.env.QCOW2_FUZZ_SEED !== undefined) return Number(process.env.QCOW2_FUZZ_SEED);
  let hash = Number(process.env.QCOW2_FUZZ_SALT ?? 7);
  for (const char of name) hash = (Math.imul(hash, 37) + char.charCodeAt(0)) | 0;
  return hash;
}

/** Every file of `dir` with its bytes: writes change the data file too, so each case starts from all of them. */
async function snapshotFiles(dir: string): Promise<Map<string, Buffer>> {
  const files = new Map<string, Buffer>();
  for (const name of await readdir(dir)) files.set(path.join(dir, name), await readFile(path.join(dir, name)));
  return files;
}

for (const seed of SEEDS) {
  test(`fuzzed ${seed.name} images opened writable: coded errors only, and qemu-img check never finds them made worse`, async (t) => {
    const dir = await tempDir(t);
    const pristinePath = await seed.make(dir);
    const pristine = await readFile(pristinePath);
    const layout = readLayout(pristine);
    const files = await snapshotFiles(dir);
    const child = new FuzzChild(HANG_AFTER_MS);
    t.teardown(() => child.close());
    const counts = { failing: 0, cleanBefore: 0, cleanAndWritten: 0, checksCompared: 0, checksAgreed: 0 };
    // One case in five writes to the seed as qemu made it: the write path's baseline on every kind of image.
    const base = fc.oneof({ weight: 4, arbitrary: fuzzCaseArbitrary(layout) }, { weight: 1, arbitrary: fc.record({ mutations: fc.constant([]), tinyCache: fc.boolean() }) });
    const arbitrary = fc.record({ base, ops: writeOpsArbitrary });
    const collected: string[] = [];
    const property = fc.asyncProperty(arbitrary, async ({ base: { mutations, tinyCache }, ops }) => {
      const mutated = resolveMutations(pristine, layout, mutations);
      for (const [file, bytes] of files) await writeFile(file, bytes);
      await writeFile(pristinePath, mutated.bytes);
      const out = path.join(dir, 'out.raw');
      const result = await child.run({ image: pristinePath, follow: seed.follow, out, guestLimit: 64 << 20, tinyCache, writeOps: ops });
      if (result.problems.length > 0) {
        const cache = tinyCache ? ' (opened with a tiny L2 cache)' : '';
        const failure = `seed image '${seed.name}'${cache}, changes:\n${describeMutated(mutated)}\nrequests: ${JSON.stringify(ops)}\n${result.problems.join('\n')}`;
        if (!COLLECT) throw new Error(failure);
        collected.push(failure);
      }
      if (result.outcomes.some((o) => o.code !== undefined)) counts.failing++;
      if (result.writeSide?.cleanBefore) counts.cleanBefore++;
      if (result.writeSide?.cleanBefore && result.writeSide.wrote) counts.cleanAndWritten++;
      if (result.writeSide?.checkAgreed !== undefined) counts.checksCompared++;
      if (result.writeSide?.checkAgreed) counts.checksAgreed++;
      if (result.writeSide?.checkDisagreement) t.log(`checks differ on '${seed.name}' with changes:\n${describeMutated(mutated)}\n${result.writeSide.checkDisagreement}`);
    });
    // No shrinking: each shrink step could be another hang.
    await fc.assert(property, { seed: fcSeed(seed.name), numRuns: RUNS, endOnFailure: true, includeErrorInReport: true });
    t.log(
      `${RUNS} cases: ${counts.failing} with failing steps, ${counts.cleanBefore} clean before, ${counts.cleanAndWritten} clean and written to; ` +
        `our check and qemu-img check counted the same in ${counts.checksAgreed} of ${counts.checksCompared}`,
    );
    t.deepEqual(collected, [], `${collected.length} failing cases`);
    // Both properties must be reached: errors on hostile images, and writes on images qemu finds clean.
    t.true(counts.failing > 0);
    t.true(counts.cleanAndWritten > 0);
  });
}
