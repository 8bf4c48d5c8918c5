/**
 * One lane of the crash torture: rounds on one image of one variant, each round a child process
 * killed with SIGKILL at a seeded moment, then checked: qemu-img check finds no corruption, our
 * check agrees with it, leaks are repairable, and every byte a completed flush acknowledged
 * reads back. The image carries over to the next round (damage would accumulate), and is made
 * afresh every few rounds.
 */
import { spawn } from 'node:child_process';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';

import { open } from '../../../ts/index.js';
import { readHeader } from '../../../ts/qcow2/header.js';
import { runProgram } from '../qemu.js';
import type { ChildConfig } from './child.js';
import { below, deriveSeed, random } from './random.js';
import { qemuCrashRound } from './qemu-crash.js';
import { RoundLog, expectRound, findMismatch, parseLog } from './verify.js';
import { TortureVariant, freshImage, modelLength } from './variants.js';

const CHILD_SCRIPT = path.join(__dirname, 'child.js');

/** What a check reports, in the terms both checkers share. */
export interface CheckCounts {
  corruptions: number;
  leaks: number;
  checkErrors: number;
}

/** Our check of an image (the library's check()), and with `repair` its repair. */
export type OurCheck = (file: string, repair?: 'leaks' | 'all') => Promise<CheckCounts>;

export interface LaneOptions {
  variant: TortureVariant;
  /** Everything the lane does follows from it (but for the exact moment the kernel delivers a kill). */
  seed: number;
  /** Rounds to run, one kill each. */
  kills: number;
  /** Rounds on one image before starting a new one. */
  roundsPerImage: number;
  /** The lane's working folder (made if missing). */
  dir: string;
  /** Where the files of a failing round are kept for replay. */
  failureDir: string;
  /** The longest a child runs after its image is open. */
  maxRunMs: number;
  check: OurCheck;
  /** Called after each round that passed. */
  onRound?: (report: RoundReport) => void;
}

/** One round that passed. */
export interface RoundReport {
  variant: string;
  seed: number;
  round: number;
  /** Operations issued before the kill, and how many of them the last acknowledged flush covers. */
  issued: number;
  settled: number;
  leaks: number;
  /** Who wrote the image this round: our child, or qemu-io killing itself. */
  writer: 'ours' | 'qemu-io';
  /** The kill left the image dirty (lazy refcounts, qemu-io rounds or a child killed before its open rebuilt them). */
  dirty: boolean;
  /** Time of the whole round, and of the child alone (spawn to death). */
  ms: number;
  childMs: number;
}

export interface LaneResult {
  variant: string;
  seed: number;
  /** Rounds that ended in a kill and passed every check. */
  kills: number;
  /** What went wrong, with where the round's files are kept; undefined when every round passed. */
  failure?: string;
}

/** The command that runs a failed lane again, up to its failing round. */
export function replayCommand(result: LaneResult): string {
  return `npm run torture -- --variant ${result.variant} --lane-seed ${result.seed} --kills ${result.kills + 1}`;
}

/** A round's failure; the lane stops at the first one. */
class RoundFailure extends Error {}

function fail(message: string): never {
  throw new RoundFailure(message);
}

/** When to kill: at a moment counted from the spawn (may hit start-up or the open), or from the moment the image is open. */
interface KillPlan {
  fromSpawn: boolean;
  delayMs: number;
}

function killPlan(seed: number, maxRunMs: number): KillPlan {
  const rnd = random(seed);
  if (rnd() < 0.12) return { fromSpawn: true, delayMs: 40 + below(rnd, 400) };
  return { fromSpawn: false, delayMs: below(rnd, maxRunMs) };
}

interface ChildOutcome {
  killed: boolean;
  code: number | null;
  signal: string | null;
  stderr: string;
}

/** A child that does not open its image within this time is hung (generous: the machine is busy). */
const HANG_MS = 60_000;

function runChild(config: ChildConfig, plan: KillPlan): Promise<ChildOutcome> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CHILD_SCRIPT, JSON.stringify(config)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    let hung = false;
    const kill = () => child.kill('SIGKILL');
    let killTimer = plan.fromSpawn ? setTimeout(kill, plan.delayMs) : undefined;
    const hangTimer = setTimeout(() => {
      hung = true;
      kill();
    }, HANG_MS + plan.delayMs);
    child.stdout.once('data', () => {
      if (!plan.fromSpawn) killTimer = setTimeout(kill, plan.delayMs);
    });
    child.stderr.on('data', (chunk: Buffer) => (stderr = (stderr + chunk.toString()).slice(-4000)));
    child.on('close', (code, signal) => {
      clearTimeout(killTimer);
      clearTimeout(hangTimer);
      if (hung) stderr += `\n(the child did not open its image within ${HANG_MS} ms)`;
      resolve({ killed: signal === 'SIGKILL' && !hung, code, signal, stderr });
    });
  });
}

/**
 * Copy an image keeping its holes: the engine grows files far ahead of their data, and whole
 * copies of that slack, several per round, would write hundreds of MiB a second.
 */
async function copyImage(from: string, to: string): Promise<void> {
  const r = await runProgram('cp', ['--sparse=always', from, to]);
  if (r.code !== 0) throw new Error(`cp ${from} ${to}: ${r.stderr}`);
}

/** qemu-img check --output=json (optionally with -r), and its exit code. */
async function qemuCheck(file: string, repair?: 'leaks' | 'all'): Promise<CheckCounts & { code: number; text: string }> {
  const r = await runProgram('qemu-img', ['check', '--output=json', ...(repair ? ['-r', repair] : []), file]);
  let report: Record<string, number>;
  try {
    report = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as Record<string, number>;
  } catch {
    fail(`qemu-img check ${file} gave no report (exit ${r.code}): ${r.stdout}${r.stderr}`);
  }
  return {
    corruptions: report.corruptions ?? 0,
    leaks: report.leaks ?? 0,
    checkErrors: report['check-errors'] ?? 0,
    code: r.code,
    text: `exit ${r.code}: ${r.stdout.trim()} ${r.stderr.trim()}`,
  };
}

/** Our check must count what qemu-img check counts. */
async function compareChecks(file: string, check: OurCheck, qemu: CheckCounts, when: string): Promise<void> {
  const ours = await check(file);
  if (ours.corruptions !== qemu.corruptions || ours.leaks !== qemu.leaks || ours.checkErrors !== qemu.checkErrors) {
    fail(`${when}: our check counts ${JSON.stringify(ours)}, qemu-img check ${JSON.stringify(qemu)}`);
  }
}

/** Both repairs, qemu-img check -r and our check with `repair`, each on a copy, must leave an image qemu-img check finds clean. */
async function checkRepairs(file: string, dir: string, check: OurCheck, repair: 'leaks' | 'all'): Promise<void> {
  const copy = path.join(dir, 'repair.qcow2');
  await copyImage(file, copy);
  await qemuCheck(copy, repair);
  const afterQemu = await qemuCheck(copy);
  if (afterQemu.code !== 0) fail(`qemu-img check -r ${repair} left problems: ${afterQemu.text}`);
  await copyImage(file, copy);
  await check(copy, repair);
  const afterOurs = await qemuCheck(copy);
  if (afterOurs.code !== 0) fail(`our check with repair '${repair}' left problems qemu-img check sees: ${afterOurs.text}`);
  await rm(copy);
}

/**
 * The checks of a killed image's metadata. A dirty image (lazy refcounts) may have refcounts
 * too low: both checks must count the same, both repairs must fix it, and unless `leaveDirty`
 * (the next child's open is to rebuild), our writable open must rebuild it clean. Leaks stay in
 * the image from round to round; the repairs are tried when their count changed (`knownLeaks`
 * is the count after the round before).
 */
async function checkIntegrity(files: RoundFiles, dir: string, check: OurCheck, leaveDirty: boolean, knownLeaks: number): Promise<{ leaks: number; dirty: boolean }> {
  const file = files.image;
  const { header } = await readHeader(file);
  if (header.dirty) {
    if (!header.lazyRefcounts) fail('the image is dirty but lazy refcounts are off');
    const dirty = await qemuCheck(file);
    if (dirty.checkErrors !== 0) fail(`qemu-img check of the dirty image: ${dirty.text}`);
    await compareChecks(file, check, dirty, 'dirty image');
    await checkRepairs(file, dir, check, 'all');
    if (leaveDirty) return { leaks: dirty.leaks, dirty: true };
    await copyImage(file, files.killed);
    const image = await open(file, { followFileNames: true });
    await image.close();
    const rebuilt = await qemuCheck(file);
    if (rebuilt.code !== 0) fail(`after our writable open rebuilt the refcounts of the dirty image, qemu-img check: ${rebuilt.text}`);
    await compareChecks(file, check, rebuilt, 'after our rebuild');
    return { leaks: dirty.leaks, dirty: true };
  }
  const report = await qemuCheck(file);
  if (report.corruptions !== 0 || report.checkErrors !== 0 || (report.code !== 0 && report.code !== 3)) {
    fail(`qemu-img check after the kill: ${report.text}`);
  }
  await compareChecks(file, check, report, 'after the kill');
  if (report.leaks > 0 && report.leaks !== knownLeaks) await checkRepairs(file, dir, check, 'leaks');
  return { leaks: report.leaks, dirty: false };
}

/** The disk's bytes as qemu reads them, and the same read through the library, which must agree. */
async function readDisk(file: string, dir: string): Promise<Buffer> {
  const raw = path.join(dir, 'disk.raw');
  const r = await runProgram('qemu-img', ['convert', '-O', 'raw', file, raw]);
  if (r.code !== 0) fail(`qemu-img convert could not read the image: ${r.stderr}`);
  const theirs = await readFile(raw);
  await rm(raw);
  const image = await open(file, { readOnly: true, followFileNames: true });
  try {
    if (image.size !== theirs.length) fail(`our open sees a disk of ${image.size} bytes, qemu ${theirs.length}`);
    const ours = Buffer.alloc(image.size);
    await image.read(ours, 0);
    if (!ours.equals(theirs)) {
      let at = 0;
      while (ours[at] === theirs[at]) at++;
      fail(`our read and qemu's differ from guest offset ${at}`);
    }
  } finally {
    await image.close();
  }
  return theirs;
}

/** The state of a lane between rounds. */
interface LaneState {
  /** The guest bytes the image holds (model length, zeros past the disk). */
  baseline: Buffer;
  size: number;
  /** Leaks qemu-img check counted after the last round. */
  leaks: number;
}

/** Run one round: spawn, kill, check, verify; returns the new state and the round's figures. */
async function runRound(options: LaneOptions, state: LaneState, round: number, files: RoundFiles): Promise<{ state: LaneState; report: RoundReport }> {
  const started = Date.now();
  const { variant } = options;
  const seed = deriveSeed(options.seed, round);
  const config: ChildConfig = { image: files.image, log: files.log, seed, size: state.size, geometry: variant.geometry };
  await writeFile(files.log, '');
  await writeFile(files.config, JSON.stringify(config) + '\n');
  await copyImage(files.image, files.before);
  await rm(files.killed, { force: true });
  const byQemu = variant.qemuCrashes === true && round % 2 === 0;
  // QEMU writes compressed clusters only where nothing is allocated yet.
  const geometry = byQemu ? { ...variant.geometry, compressed: false } : variant.geometry;
  const spawned = Date.now();
  let log: RoundLog;
  if (byQemu) {
    log = await qemuCrashRound(files.image, seed, state.size, geometry, options.dir);
  } else {
    const outcome = await runChild(config, killPlan(deriveSeed(seed, 0x6b11), options.maxRunMs));
    if (!outcome.killed) fail(`the child ended by itself (code ${outcome.code}, signal ${outcome.signal}): ${outcome.stderr}`);
    log = parseLog(await readFile(files.log, 'utf8'));
  }
  const childMs = Date.now() - spawned;
  const { leaks, dirty } = await checkIntegrity(files, options.dir, options.check, byQemu, state.leaks);
  const actual = await readDisk(files.image, options.dir);
  const expect = expectRound(state.baseline, state.size, seed, geometry, log, byQemu);
  const mismatch = findMismatch(expect, actual);
  if (mismatch) fail(`data after the kill (last flush acknowledged: operation #${log.lastFlush}, last issued: #${log.lastIssued}): ${mismatch}`);
  const baseline = Buffer.alloc(modelLength(variant));
  actual.copy(baseline);
  return {
    state: { baseline, size: actual.length, leaks },
    report: {
      variant: variant.name,
      seed: options.seed,
      round,
      issued: log.lastIssued + 1,
      settled: log.lastFlush + 1,
      leaks,
      writer: byQemu ? 'qemu-io' : 'ours',
      dirty,
      ms: Date.now() - started,
      childMs,
    },
  };
}

/** The files of a lane's rounds. */
interface RoundFiles {
  image: string;
  log: string;
  config: string;
  /** The image before the round (for replay). */
  before: string;
  /** The image right after the kill, kept when a check is about to change it (our reopen rebuilding a dirty image). */
  killed: string;
}

/** Run a lane; resolves with the kills that passed and the first failure, if any. */
export async function runLane(options: LaneOptions): Promise<LaneResult> {
  const { variant, dir } = options;
  await mkdir(dir, { recursive: true });
  const files: RoundFiles = {
    image: path.join(dir, 'image.qcow2'),
    log: path.join(dir, 'ops.log'),
    config: path.join(dir, 'child.json'),
    before: path.join(dir, 'before.qcow2'),
    killed: path.join(dir, 'killed.qcow2'),
  };
  const result: LaneResult = { variant: variant.name, seed: options.seed, kills: 0 };
  let state: LaneState | undefined;
  for (let round = 0; round < options.kills; round++) {
    try {
      if (round % options.roundsPerImage === 0) {
        await rm(files.image, { force: true });
        state = { baseline: await freshImage(variant, files.image), size: variant.size, leaks: 0 };
      }
      const next = await runRound(options, state!, round, files);
      state = next.state;
      result.kills++;
      options.onRound?.(next.report);
    } catch (error) {
      const kept = await keepFailure(options, round, files);
      const what = error instanceof RoundFailure ? error.message : `unexpected error: ${(error as Error)?.stack ?? String(error)}`;
      result.failure = `${variant.name} seed ${options.seed} round ${round}: ${what}\n  files kept in ${kept}`;
      break;
    }
  }
  await rm(dir, { recursive: true, force: true });
  return result;
}

/** Copy a failing round's files (image before, after the kill when it was changed since, now, log, child config, base) where they survive the lane. */
async function keepFailure(options: LaneOptions, round: number, files: RoundFiles): Promise<string> {
  const target = path.join(options.failureDir, `${options.variant.name}-seed${options.seed}-round${round}`);
  await mkdir(target, { recursive: true });
  const names: [string, string][] = [
    [files.before, 'before.qcow2'],
    [files.killed, 'killed.qcow2'],
    [files.image, 'now.qcow2'],
    [files.log, 'ops.log'],
    [files.config, 'child.json'],
    [path.join(options.dir, 'base.qcow2'), 'base.qcow2'],
  ];
  for (const [from, name] of names) await copyImage(from, path.join(target, name)).catch(() => undefined);
  return target;
}
