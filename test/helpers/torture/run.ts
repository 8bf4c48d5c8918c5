/**
 * The long crash torture (`npm run torture`): many lanes over every variant, a few at a time,
 * with progress lines and a summary; exits non-zero when a round fails, naming how to replay it.
 *
 *   npm run torture -- [--kills 5000] [--seed N] [--variant NAME[,NAME…]] [--jobs 4]
 *                      [--lane-kills 25] [--rounds-per-image 6] [--max-run-ms 600] [--keep DIR]
 *   npm run torture -- --variant NAME --lane-seed S --kills K     (replay one lane)
 */
import os from 'node:os';
import path from 'node:path';
import { mkdtemp, rm } from 'node:fs/promises';

import { LaneResult, RoundReport, replayCommand, runLane } from './lane.js';
import { libraryCheck } from './our-check.js';
import { deriveSeed } from './random.js';
import { TORTURE_VARIANTS, TortureVariant, variantNamed } from './variants.js';

interface RunOptions {
  kills: number;
  seed: number;
  variants: TortureVariant[];
  jobs: number;
  laneKills: number;
  roundsPerImage: number;
  maxRunMs: number;
  keep: string;
  /** Run one lane with exactly this seed (replay). */
  laneSeed?: number;
}

function parseOptions(argv: string[]): RunOptions {
  const options: RunOptions = {
    kills: 1000,
    seed: Date.now() % 1_000_000,
    variants: TORTURE_VARIANTS,
    jobs: 4,
    laneKills: 25,
    roundsPerImage: 6,
    maxRunMs: 600,
    keep: path.join(os.tmpdir(), 'qcow2-torture-failures'),
  };
  for (let i = 0; i < argv.length; i++) {
    const [name, inline] = argv[i].split('=', 2);
    const value = () => inline ?? argv[++i];
    const number = () => {
      const text = value();
      const n = Number(text);
      if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${name} takes a non-negative integer, got '${text}'`);
      return n;
    };
    switch (name) {
      case '--kills': options.kills = number(); break;
      case '--seed': options.seed = number(); break;
      case '--variant': options.variants = value().split(',').map(variantNamed); break;
      case '--jobs': options.jobs = Math.max(1, number()); break;
      case '--lane-kills': options.laneKills = Math.max(1, number()); break;
      case '--rounds-per-image': options.roundsPerImage = Math.max(1, number()); break;
      case '--max-run-ms': options.maxRunMs = Math.max(1, number()); break;
      case '--keep': options.keep = value(); break;
      case '--lane-seed': options.laneSeed = number(); break;
      default: throw new Error(`unknown option '${argv[i]}' (see the top of ${__filename})`);
    }
  }
  return options;
}

/** One lane to run: its variant, seed and kills. */
interface LanePlan {
  variant: TortureVariant;
  seed: number;
  kills: number;
}

/** Spread the kills over the variants in lanes of at most laneKills, variants taking turns. */
function planLanes(options: RunOptions): LanePlan[] {
  if (options.laneSeed !== undefined) {
    return [{ variant: options.variants[0], seed: options.laneSeed, kills: options.kills }];
  }
  const lanes: LanePlan[] = [];
  let left = options.kills;
  for (let n = 0; left > 0; n++) {
    const v = n % options.variants.length;
    const kills = Math.min(left, options.laneKills);
    lanes.push({ variant: options.variants[v], seed: deriveSeed(options.seed, v, n), kills });
    left -= kills;
  }
  return lanes;
}

/** Per-variant figures for the summary. */
interface Tally {
  kills: number;
  withLeaks: number;
  dirty: number;
  byQemu: number;
  ms: number;
}

async function main(): Promise<number> {
  const options = parseOptions(process.argv.slice(2));
  const lanes = planLanes(options);
  const root = await mkdtemp(path.join(os.tmpdir(), 'qcow2-torture-'));
  const started = Date.now();
  const tallies = new Map<string, Tally>();
  let done = 0;
  let lastPrint = 0;
  const onRound = (r: RoundReport) => {
    const t = tallies.get(r.variant) ?? { kills: 0, withLeaks: 0, dirty: 0, byQemu: 0, ms: 0 };
    t.kills++;
    t.withLeaks += r.leaks > 0 ? 1 : 0;
    t.dirty += r.dirty ? 1 : 0;
    t.byQemu += r.writer === 'qemu-io' ? 1 : 0;
    t.ms += r.ms;
    tallies.set(r.variant, t);
    done++;
    if (Date.now() - lastPrint > 5000) {
      lastPrint = Date.now();
      const s = (Date.now() - started) / 1000;
      console.log(`${done}/${options.kills} kills passed, ${s.toFixed(0)} s, ${(done / s).toFixed(1)} kills/s`);
    }
  };
  console.log(`crash torture: ${options.kills} kills, seed ${options.seed}, ${lanes.length} lanes, ${options.jobs} at a time, variants ${options.variants.map((v) => v.name).join(', ')}`);
  const results: LaneResult[] = [];
  let next = 0;
  const worker = async () => {
    while (next < lanes.length) {
      const plan = lanes[next];
      const dir = path.join(root, `lane${next++}`);
      const result = await runLane({
        ...plan,
        roundsPerImage: options.roundsPerImage,
        dir,
        failureDir: options.keep,
        maxRunMs: options.maxRunMs,
        check: libraryCheck,
        onRound,
      });
      if (result.failure) {
        console.log(`FAILED ${result.failure}\n  replay: ${replayCommand(result)}`);
      }
      results.push(result);
    }
  };
  await Promise.all(Array.from({ length: options.jobs }, worker));
  await rm(root, { recursive: true, force: true });
  const seconds = (Date.now() - started) / 1000;
  console.log(`\nvariant                        kills  with leaks  dirty  by qemu-io  ms/round`);
  for (const [name, t] of tallies) {
    console.log(`${name.padEnd(30)} ${String(t.kills).padStart(5)}  ${String(t.withLeaks).padStart(10)}  ${String(t.dirty).padStart(5)}  ${String(t.byQemu).padStart(10)}  ${(t.ms / t.kills).toFixed(0).padStart(8)}`);
  }
  const failures = results.filter((r) => r.failure);
  const seed = options.laneSeed === undefined ? `seed ${options.seed}` : `lane seed ${options.laneSeed}`;
  console.log(`\n${done} kills passed in ${seconds.toFixed(0)} s (${seed}); ${failures.length} lane(s) failed`);
  for (const f of failures) console.log(`  ${f.failure}`);
  return failures.length === 0 && done === options.kills ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    console.error(`torture: ${(error as Error)?.message ?? String(error)}`);
    process.exit(2);
  },
);
