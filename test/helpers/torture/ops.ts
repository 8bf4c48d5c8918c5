/**
 * The operations a torture child runs, as an endless seeded stream of steps, and their effect on
 * guest bytes. The child and the parent build the same stream from the same seed: the child runs
 * it, the parent replays it into its model.
 */
import { below, dataBytes, deriveSeed, random } from './random.js';

/** The shape of the disk the operations aim at. */
export interface Geometry {
  /** Bytes per cluster (operations are aligned to it or deliberately not). */
  clusterSize: number;
  /** Put compressed writes (whole clusters) in the mix. */
  compressed: boolean;
  /** Grow the disk now and then, up to this many bytes (a multiple of the cluster size). */
  maxSize?: number;
}

/** One guest operation; `index` numbers the operations of a round from 0. */
export type Op =
  | { kind: 'write'; index: number; offset: number; length: number; seed: number }
  | { kind: 'compressed'; index: number; offset: number; length: number; seed: number }
  | { kind: 'zero'; index: number; offset: number; length: number; unmap: boolean }
  | { kind: 'discard'; index: number; offset: number; length: number }
  | { kind: 'flush'; index: number }
  | { kind: 'grow'; index: number; size: number };

/** Operations issued together (their clusters are disjoint, so their order does not matter), or one flush or grow. */
export type Step = Op[];

/** The bytes an operation writes, when it writes data. */
export function opData(op: Op): Buffer | undefined {
  if (op.kind === 'write') return dataBytes(op.length, op.seed);
  if (op.kind === 'compressed') return dataBytes(op.length, op.seed, true);
  return undefined;
}

/** The guest range an operation changes, [start, end), or undefined when it changes no guest byte. */
export function effectRange(op: Op, clusterSize: number): { start: number; end: number } | undefined {
  switch (op.kind) {
    case 'write':
    case 'compressed':
    case 'zero':
      return { start: op.offset, end: op.offset + op.length };
    case 'discard': {
      // Only whole clusters are dropped; they then read as zeros (version 3 images).
      const start = Math.ceil(op.offset / clusterSize) * clusterSize;
      const end = Math.floor((op.offset + op.length) / clusterSize) * clusterSize;
      return end > start ? { start, end } : undefined;
    }
    default:
      return undefined;
  }
}

/**
 * Apply `op` to `bytes`, which hold the guest bytes from guest offset `base`: only the part of
 * the operation's effect that falls inside them. `data` is opData(op), passed in to reuse it.
 */
export function applyOp(bytes: Buffer, base: number, op: Op, clusterSize: number, data = opData(op)): void {
  const range = effectRange(op, clusterSize);
  if (!range) return;
  const start = Math.max(range.start, base);
  const end = Math.min(range.end, base + bytes.length);
  if (end <= start) return;
  if (data) data.copy(bytes, start - base, start - range.start, end - range.start);
  else bytes.fill(0, start - base, end - base);
}

/** The clusters an operation touches, [first, last + 1). */
function clusterSpan(op: { offset: number; length: number }, clusterSize: number): [number, number] {
  return [Math.floor(op.offset / clusterSize), Math.ceil((op.offset + op.length) / clusterSize)];
}

/**
 * The endless stream of steps of one round, over a disk of `size` bytes at the start. Flushes
 * come often enough that a kill leaves few operations in doubt. With `sectorZeroes`, zero writes
 * and discards cover whole 512-byte sectors (qemu-io wants them so).
 */
export function* steps(seed: number, size: number, geometry: Geometry, sectorZeroes = false): Generator<Step> {
  const rnd = random(seed);
  const cs = geometry.clusterSize;
  let index = 0;
  for (;;) {
    const roll = rnd();
    if (roll < 0.12) {
      yield [{ kind: 'flush', index: index++ }];
      continue;
    }
    if (geometry.maxSize !== undefined && size < geometry.maxSize && roll < 0.16) {
      size = Math.min(geometry.maxSize, size + cs * (1 + below(rnd, 512)));
      yield [{ kind: 'grow', index: index++, size }];
      continue;
    }
    const batch: Op[] = [];
    const wanted = 1 + below(rnd, 4);
    for (let i = 0; i < wanted; i++) {
      const op = randomOp(rnd, size, geometry, deriveSeed(seed, index), sectorZeroes);
      const [first, last] = clusterSpan(op, cs);
      const clash = batch.some((other) => {
        const [f, l] = clusterSpan(other as RangeOp, cs);
        return first < l && f < last;
      });
      if (!clash) batch.push({ ...op, index: index++ } as Op);
    }
    yield batch;
  }
}

/** The operations that aim at a guest range, before they get their index. */
type Unindexed<T> = T extends Op ? Omit<T, 'index'> : never;
type RangeOp = Unindexed<Extract<Op, { offset: number }>>;

/** One write, zero write, discard or compressed write: aligned or not, short or long. */
function randomOp(rnd: () => number, size: number, geometry: Geometry, seed: number, sectorZeroes: boolean): RangeOp {
  const cs = geometry.clusterSize;
  const clusters = size / cs;
  const roll = rnd();
  if (geometry.compressed && roll < 0.15) {
    const offset = below(rnd, clusters) * cs;
    return { kind: 'compressed', offset, length: Math.min(cs * (1 + below(rnd, 4)), size - offset), seed };
  }
  const aligned = rnd() < 0.35;
  const longest = Math.max(4 * cs, 65536);
  let offset: number;
  let length: number;
  if (aligned) {
    offset = below(rnd, clusters) * cs;
    length = cs * (1 + below(rnd, longest / cs));
  } else {
    offset = below(rnd, size);
    length = rnd() < 0.2 ? 1 + below(rnd, 16) : 1 + below(rnd, Math.max(2 * cs, 8192));
  }
  if (roll >= 0.6 && rnd() < 0.15) length *= 16;
  length = Math.max(1, Math.min(length, size - offset));
  if (roll < 0.6) return { kind: 'write', offset, length, seed };
  if (sectorZeroes) {
    const end = Math.ceil((offset + length) / 512) * 512;
    offset -= offset % 512;
    length = end - offset;
  }
  if (roll < 0.85) return { kind: 'zero', offset, length, unmap: rnd() < 0.5 };
  return { kind: 'discard', offset, length };
}
