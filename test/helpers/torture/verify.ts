/**
 * What a killed round may have left: the parent replays the round's operations into its model.
 * Bytes last written by operations up to the last acknowledged flush must read exactly; a
 * 512-byte sector touched by an operation issued after it may hold any value those operations
 * (applied in order, each one or not) could leave.
 */
import { Geometry, Op, applyOp, effectRange, opData, steps } from './ops.js';

export const SECTOR = 512;

/** What the child's log says: the last operation issued and the last flush acknowledged (-1: none). */
export interface RoundLog {
  lastIssued: number;
  lastFlush: number;
}

/** Read the child's log; a line cut by the kill is ignored. */
export function parseLog(text: string): RoundLog {
  const log: RoundLog = { lastIssued: -1, lastFlush: -1 };
  for (const line of text.split('\n').slice(0, -1)) {
    const m = /^([SF]) (\d+)$/.exec(line);
    if (!m) throw new Error(`torture log: unexpected line '${line}'`);
    const index = Number(m[2]);
    if (m[1] === 'S') log.lastIssued = Math.max(log.lastIssued, index);
    else log.lastFlush = Math.max(log.lastFlush, index);
  }
  return log;
}

/** The model of a round after a kill. */
export interface Expectation {
  /** The guest bytes once every operation up to the last acknowledged flush has run (model length). */
  state: Buffer;
  /** Which operation last changed each sector of `state` (-1: none in this round). */
  lastWriter: Int32Array;
  /** Operations issued after the last acknowledged flush, in order. */
  uncertain: Op[];
  /** Disk sizes the image may have. */
  sizes: number[];
  clusterSize: number;
}

/**
 * Replay the round whose log is `log`, from `baseline` (the guest bytes at the start of the
 * round, as long as the disk may ever grow, zeros past its size) and its disk size `size`.
 * `sectorZeroes` as the round's steps() had it.
 */
export function expectRound(baseline: Buffer, size: number, seed: number, geometry: Geometry, log: RoundLog, sectorZeroes = false): Expectation {
  const cs = geometry.clusterSize;
  const state = Buffer.from(baseline);
  const lastWriter = new Int32Array(baseline.length / SECTOR).fill(-1);
  const uncertain: Op[] = [];
  const sizes = [size];
  for (const step of steps(seed, size, geometry, sectorZeroes)) {
    if (step[0].index > log.lastIssued) break;
    for (const op of step) {
      if (op.index > log.lastIssued) break;
      if (op.index > log.lastFlush) {
        uncertain.push(op);
        if (op.kind === 'grow') sizes.push(op.size);
        continue;
      }
      if (op.kind === 'grow') sizes[0] = op.size;
      applyOp(state, 0, op, cs);
      const range = effectRange(op, cs);
      if (range) lastWriter.fill(op.index, Math.floor(range.start / SECTOR), Math.ceil(range.end / SECTOR));
    }
  }
  return { state, lastWriter, uncertain, sizes, clusterSize: cs };
}

/** The values sector `sector` may hold: its value at the flush, then each uncertain operation applied or not. */
function candidates(expect: Expectation, sector: number, data: Map<number, Buffer | undefined>): Buffer[] {
  const base = sector * SECTOR;
  let values = [expect.state.subarray(base, base + SECTOR)];
  for (const op of expect.uncertain) {
    const range = effectRange(op, expect.clusterSize);
    if (!range || range.end <= base || range.start >= base + SECTOR) continue;
    if (!data.has(op.index)) data.set(op.index, opData(op));
    const next = values.map((value) => {
      const copy = Buffer.from(value);
      applyOp(copy, base, op, expect.clusterSize, data.get(op.index));
      return copy;
    });
    for (const value of next) if (!values.some((v) => v.equals(value))) values = [...values, value];
  }
  return values;
}

function describeOp(op: Op): string {
  return op.kind === 'flush' || op.kind === 'grow' ? `#${op.index} ${JSON.stringify(op)}` : `#${op.index} ${op.kind} ${op.offset}+${op.length}`;
}

function hex(bytes: Buffer): string {
  return bytes.subarray(0, 16).toString('hex');
}

/** Why `actual` (the disk read back, `actual.length` bytes) cannot be what the round left, or undefined when it can. */
export function findMismatch(expect: Expectation, actual: Buffer): string | undefined {
  if (!expect.sizes.includes(actual.length)) {
    return `disk size ${actual.length}, expected one of ${expect.sizes.join(', ')}`;
  }
  const sectors = actual.length / SECTOR;
  const touched = new Uint8Array(sectors);
  for (const op of expect.uncertain) {
    const range = effectRange(op, expect.clusterSize);
    if (range) touched.fill(1, Math.floor(range.start / SECTOR), Math.min(sectors, Math.ceil(range.end / SECTOR)));
  }
  const data = new Map<number, Buffer | undefined>();
  for (let s = 0; s < sectors; ) {
    let end = s;
    while (end < sectors && touched[end] === touched[s]) end++;
    const mismatch = touched[s] ? checkUncertainRun(expect, actual, s, end, data) : checkExactRun(expect, actual, s, end);
    if (mismatch) return mismatch;
    s = end;
  }
  return undefined;
}

function checkExactRun(expect: Expectation, actual: Buffer, first: number, end: number): string | undefined {
  const want = expect.state.subarray(first * SECTOR, end * SECTOR);
  const got = actual.subarray(first * SECTOR, end * SECTOR);
  if (want.equals(got)) return undefined;
  let s = first;
  while (want.subarray((s - first) * SECTOR, (s - first + 1) * SECTOR).equals(got.subarray((s - first) * SECTOR, (s - first + 1) * SECTOR))) s++;
  const at = (s - first) * SECTOR;
  const writer = expect.lastWriter[s];
  return (
    `sector ${s} (guest offset ${s * SECTOR}) was settled by a completed flush but reads ${hex(got.subarray(at))}…, ` +
    `expected ${hex(want.subarray(at))}… (last written by ${writer < 0 ? 'an earlier round' : `operation #${writer}`})`
  );
}

function checkUncertainRun(expect: Expectation, actual: Buffer, first: number, end: number, data: Map<number, Buffer | undefined>): string | undefined {
  for (let s = first; s < end; s++) {
    const got = actual.subarray(s * SECTOR, (s + 1) * SECTOR);
    const values = candidates(expect, s, data);
    if (values.some((v) => v.equals(got))) continue;
    const ops = expect.uncertain.filter((op) => {
      const r = effectRange(op, expect.clusterSize);
      return r && r.start < (s + 1) * SECTOR && r.end > s * SECTOR;
    });
    return (
      `sector ${s} (guest offset ${s * SECTOR}) reads ${hex(got)}…, none of the ${values.length} values that ` +
      `${ops.map(describeOp).join(', ')} (issued after the last acknowledged flush) could leave: ${values.map(hex).join(', ')}`
    );
  }
  return undefined;
}
