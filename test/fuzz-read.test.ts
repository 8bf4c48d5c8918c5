/**
 * Property-based fuzzing of the read side: seed images made by qemu-img get their header,
 * extensions, tables, compressed descriptors, snapshot table and bitmap directory rewritten, bits
 * flipped and the file cut short. Every read operation (info, open, read, extents, map, convert,
 * compare) must then succeed or reject with a Qcow2Error whose code is the package's or an errno
 * name; never crash, hang, or answer inconsistently. Cases run in a child process (see helpers/fuzz-driver.ts).
 *
 * Reproduce a failure with the seed and path fast-check prints, or run longer with
 * QCOW2_FUZZ_RUNS (cases per seed image) and QCOW2_FUZZ_SEED. QCOW2_FUZZ_COLLECT=1 runs every case
 * and reports all failing ones at the end instead of stopping at the first.
 */
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';

import test from 'ava';
import fc from 'fast-check';

import { FuzzChild } from './helpers/fuzz-driver.js';
import { readLayout } from './helpers/fuzz-layout.js';
import { describeMutated, fuzzCaseArbitrary, resolveMutations } from './helpers/fuzz-mutations.js';
import { SEEDS } from './helpers/fuzz-seeds.js';
import { qemuImg, qemuIo, tempDir } from './helpers/qemu.js';
import { open } from '../ts/index.js';

/** Cases per seed image: 10 seeds × 60 took 15-25 s on a busy 2-core machine. */
const RUNS = Number(process.env.QCOW2_FUZZ_RUNS ?? 60);
/** A case that takes longer is a hang: the healthy ones take well under a second. */
const HANG_AFTER_MS = 15_000;
/** Guest bytes read and converted at most, whatever size a mutated header claims. */
const GUEST_LIMIT = 64 << 20;
const COLLECT = process.env.QCOW2_FUZZ_COLLECT === '1';

/** A fixed fast-check seed per seed image (or QCOW2_FUZZ_SEED), so that every run tries the same cases. */
function fcSeed(name: string): number {
  if (process.env.QCOW2_FUZZ_SEED !== undefined) return Number(process.env.QCOW2_FUZZ_SEED);
  let hash = 0;
  for (const char of name) hash = (Math.imul(hash, 31) + char.charCodeAt(0)) | 0;
  return hash;
}

for (const seed of SEEDS) {
  test(`fuzzed ${seed.name} images: every read either works or fails with a coded Qcow2Error`, async (t) => {
    const dir = await tempDir(t);
    const pristinePath = await seed.make(dir);
    const pristine = await readFile(pristinePath);
    const layout = readLayout(pristine);
    const aimedAt = ['header', 'extensions', 'l1', 'l2Used', 'refcountTable', 'refcountBlocks', ...seed.regions] as const;
    t.deepEqual(aimedAt.filter((r) => !layout.regions.has(r)), [], 'the layout misses structures of the seed');
    const casePath = path.join(dir, `fuzz-${path.basename(pristinePath)}`);
    const child = new FuzzChild(HANG_AFTER_MS);
    t.teardown(() => child.close());
    const codes = new Map<string, number>();
    let failingCases = 0;
    const collected: string[] = [];
    const property = fc.asyncProperty(fuzzCaseArbitrary(layout), async ({ mutations, tinyCache }) => {
      const mutated = resolveMutations(pristine, layout, mutations);
      await writeFile(casePath, mutated.bytes);
      const out = path.join(dir, 'out.raw');
      const result = await child.run({ image: casePath, follow: seed.follow, out, guestLimit: GUEST_LIMIT, tinyCache });
      if (result.problems.length > 0) {
        const cache = tinyCache ? ' (opened with a tiny L2 cache)' : '';
        const failure = `seed image '${seed.name}'${cache}, changes:\n${describeMutated(mutated)}\n${result.problems.join('\n')}`;
        if (!COLLECT) throw new Error(failure);
        collected.push(failure);
      }
      const failed = result.outcomes.filter((o) => o.code !== undefined);
      if (failed.length > 0) failingCases++;
      for (const o of failed) codes.set(o.code!, (codes.get(o.code!) ?? 0) + 1);
    });
    // No shrinking: each shrink step could be another hang, and three mutations are small already.
    await fc.assert(property, { seed: fcSeed(seed.name), numRuns: RUNS, endOnFailure: true, includeErrorInReport: true });
    t.log(`${RUNS} cases, ${failingCases} with failing steps; codes: ${JSON.stringify(Object.fromEntries(codes))}`);
    t.deepEqual(collected, [], `${collected.length} failing cases`);
    // The mutations must reach the error paths, or the test proves nothing.
    t.true(failingCases > 0);
  });
}

test('the fuzz harness reports a crash, a hang and an error without a code, naming the step', async (t) => {
  const child = new FuzzChild(HANG_AFTER_MS);
  // A short limit only where the hang is certain: a fresh child may take a while to load on a busy machine.
  const hanging = new FuzzChild(1000);
  t.teardown(() => {
    child.close();
    hanging.close();
  });
  const request = { image: '/nonexistent', follow: false, out: '/nonexistent', guestLimit: 0, tinyCache: false };
  const crash = await child.run({ ...request, selfTest: 'crash' });
  t.regex(crash.problems.join('\n'), /died \(signal SIGSEGV\) during step 'self test: crash'/);
  const hang = await hanging.run({ ...request, selfTest: 'hang' });
  t.regex(hang.problems.join('\n'), /no answer within 1 s \(a hang\) during step/);
  const uncoded = await child.run({ ...request, selfTest: 'uncoded error' });
  t.regex(uncoded.problems.join('\n'), /self test: uncoded error threw something other than a Qcow2Error/);
  // After a crash, a fresh child takes the next case.
  const after = await child.run({ ...request, image: '/nonexistent/x.qcow2' });
  t.deepEqual(after.problems, []);
  t.true(after.outcomes.some((o) => o.step === 'open' && o.code === 'ENOENT'));
});

/** The offset of the length field of the header extension of `type` (the header is version 3). */
function extensionLengthField(bytes: Buffer, type: number): number {
  for (let at = bytes.readUInt32BE(100); bytes.readUInt32BE(at) !== 0; at += 8 + Math.ceil(bytes.readUInt32BE(at + 4) / 8) * 8) {
    if (bytes.readUInt32BE(at) === type) return at + 4;
  }
  throw new Error(`no header extension 0x${type.toString(16)}`);
}

/** Make the u32 name length at `field` cover `extra` more bytes: the NUL bytes that follow the name. */
async function padNameWithNuls(file: string, field: number, nameAt: number, extra: number): Promise<void> {
  const bytes = await readFile(file);
  const length = bytes.readUInt32BE(field);
  if (bytes.subarray(nameAt + length, nameAt + length + extra).some((b) => b !== 0)) throw new Error('the name is not followed by NUL bytes');
  bytes.writeUInt32BE(length + extra, field);
  await writeFile(file, bytes);
}

// Found by the fuzzer: a NUL byte in a name made Node's fs refuse the path (ERR_INVALID_ARG_VALUE, no package code).
test('backing and data file names padded with NUL bytes name the file before the first NUL, as qemu reads them', async (t) => {
  const dir = await tempDir(t);
  const base = path.join(dir, 'base.qcow2');
  await qemuImg('create', '-f', 'qcow2', base, '1M');
  await qemuIo(base, '-c', 'write -P 7 0 64k');
  const overlay = path.join(dir, 'overlay.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', overlay, '1M');
  const header = await readFile(overlay);
  await padNameWithNuls(overlay, 16, Number(header.readBigUInt64BE(8)), 6);
  // qemu (the oracle) reads the base through the padded name.
  await qemuIo(overlay, '-r', '-c', 'read -P 7 0 64k');
  const image = await open(overlay, { readOnly: true, followFileNames: true });
  const data = Buffer.alloc(65536);
  await image.read(data, 0);
  await image.close();
  t.true(data.equals(Buffer.alloc(65536, 7)));

  // An absolute data file name of 8n + 5 bytes leaves three NUL bytes of padding to take in.
  const dataPath = path.join(dir, 'd'.repeat(8 - ((dir.length + 1 + 4) % 8) + 5) + '.raw');
  t.is(Buffer.byteLength(dataPath) % 8, 5);
  const external = path.join(dir, 'external.qcow2');
  await qemuImg('create', '-f', 'qcow2', '-o', `data_file=${dataPath}`, external, '1M');
  await qemuIo(external, '-c', 'write -P 9 0 64k');
  const field = extensionLengthField(await readFile(external), 0x44415441);
  await padNameWithNuls(external, field, field + 4, 3);
  await qemuIo(external, '-r', '-c', 'read -P 9 0 64k');
  const withData = await open(external, { readOnly: true, followFileNames: true });
  await withData.read(data, 0);
  await withData.close();
  t.true(data.equals(Buffer.alloc(65536, 9)));
});
