/**
 * Mutations of a seed image for the read-side fuzz tests: fast-check arbitraries that describe
 * them abstractly (a region, a slot index, a value operation), and their resolution into the
 * concrete byte edits applied to a copy of the seed.
 */
import fc from 'fast-check';

import { Layout, OFFSET_MASK, RegionName, Slot } from './fuzz-layout.js';

/** How a slot's value changes. */
export type ValueOp =
  | { op: 'flip'; bit: number }
  | { op: 'set'; value: bigint }
  | { op: 'add'; delta: number }
  | { op: 'special'; which: number }
  /** Keep the flag bits, point the offset at the start of another structure. */
  | { op: 'point'; target: number };

/** One change to the seed. Indices are taken modulo what they index, so every value is valid for every seed. */
export type Mutation =
  | { kind: 'field'; region: RegionName; index: number; value: ValueOp }
  | { kind: 'byte'; region: RegionName; index: number; byte: number }
  | { kind: 'flip'; at: number; bit: number }
  /** Copy bytes of one structure over another (an L2 table over the L1 table, a descriptor over a refcount block, …). */
  | { kind: 'copy'; from: RegionName; fromIndex: number; to: RegionName; toIndex: number; length: number }
  | { kind: 'zero'; region: RegionName; index: number; length: number }
  | { kind: 'truncate'; at: number; boundary: boolean };

/** One concrete byte edit: what `resolveMutations` wrote where. */
export interface Edit {
  offset: number;
  before: string;
  after: string;
  /** The mutation it came from, for the failure message. */
  what: string;
}

/** A mutated image: the bytes to write, and what was changed. */
export interface MutatedImage {
  bytes: Buffer;
  edits: Edit[];
  /** Set when the file was cut short. */
  truncatedTo?: number;
}

const U64_MAX = (1n << 64n) - 1n;

const valueOpArbitrary: fc.Arbitrary<ValueOp> = fc.oneof(
  { weight: 3, arbitrary: fc.record({ op: fc.constant('flip' as const), bit: fc.nat(63) }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('set' as const), value: fc.bigInt({ min: 0n, max: U64_MAX }) }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('add' as const), delta: fc.integer({ min: -8, max: 8 }) }) },
  { weight: 4, arbitrary: fc.record({ op: fc.constant('special' as const), which: fc.nat(63) }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('point' as const), target: fc.nat() }) },
);

/** Mutations aimed at the regions `layout` has; weighted towards rewriting fields. */
export function mutationArbitrary(layout: Layout): fc.Arbitrary<Mutation> {
  const region = fc.constantFrom(...layout.regions.keys());
  return fc.oneof(
    { weight: 12, arbitrary: fc.record({ kind: fc.constant('field' as const), region, index: fc.nat(), value: valueOpArbitrary }) },
    { weight: 2, arbitrary: fc.record({ kind: fc.constant('byte' as const), region, index: fc.nat(), byte: fc.nat(255) }) },
    { weight: 3, arbitrary: fc.record({ kind: fc.constant('flip' as const), at: fc.nat(), bit: fc.nat(7) }) },
    {
      weight: 1,
      arbitrary: fc.record({ kind: fc.constant('copy' as const), from: region, fromIndex: fc.nat(), to: region, toIndex: fc.nat(), length: fc.integer({ min: 1, max: 4096 }) }),
    },
    { weight: 1, arbitrary: fc.record({ kind: fc.constant('zero' as const), region, index: fc.nat(), length: fc.integer({ min: 1, max: 4096 }) }) },
    { weight: 2, arbitrary: fc.record({ kind: fc.constant('truncate' as const), at: fc.nat(), boundary: fc.boolean() }) },
  );
}

/** One fuzz case: one to three mutations of one seed, opened with the default L2 cache or a tiny one. */
export interface FuzzCase {
  mutations: Mutation[];
  /** Open with a 4 KiB L2 cache of 512-byte slices, so that every table is evicted and reloaded. */
  tinyCache: boolean;
}

/** Fuzz cases for one seed. */
export function fuzzCaseArbitrary(layout: Layout): fc.Arbitrary<FuzzCase> {
  return fc.record({ mutations: fc.array(mutationArbitrary(layout), { minLength: 1, maxLength: 3 }), tinyCache: fc.boolean() });
}

/** Values worth trying in a field of `width` bytes that held `old`: limits, offsets at and past the end of the file. */
function specialValues(width: number, old: bigint, layout: Layout): bigint[] {
  const mask = width === 8 ? U64_MAX : (1n << BigInt(8 * width)) - 1n;
  const size = BigInt(layout.fileSize);
  const cluster = BigInt(layout.clusterSize);
  const alignedEnd = ((size + cluster - 1n) / cluster) * cluster;
  const common = [0n, mask, mask >> 1n, (mask >> 1n) + 1n, 1n, old + 1n, old - 1n, old * 2n, old / 2n, size, size - 1n];
  if (width === 1) return [...common, 2n, 3n, 8n, 0x80n];
  if (width === 2) return [...common, 0x8000n, 1024n];
  if (width === 4) return [...common, 8n, 9n, 21n, 22n, 63n, 64n, 1024n, 0x10000000n, cluster, cluster + 8n, 2n ** 22n];
  const flags = old & ~OFFSET_MASK;
  const at = (offset: bigint) => flags | (offset & OFFSET_MASK);
  return [
    ...common,
    1n << 63n,
    1n << 62n,
    3n << 62n,
    old | (1n << 56n),
    old | 1n,
    old ^ (1n << 62n),
    old ^ (1n << 63n),
    at(0n),
    at(cluster),
    at(alignedEnd),
    at(alignedEnd - cluster),
    at(alignedEnd + cluster),
    at(1n << 40n),
    at(OFFSET_MASK),
    2n ** 53n,
    2n ** 53n - cluster,
    old + cluster,
    old - cluster,
  ];
}

function applyOp(op: ValueOp, old: bigint, width: number, layout: Layout): bigint {
  const mask = width === 8 ? U64_MAX : (1n << BigInt(8 * width)) - 1n;
  switch (op.op) {
    case 'flip':
      return old ^ (1n << BigInt(op.bit % (8 * width)));
    case 'set':
      return op.value & mask;
    case 'add':
      // Wide fields are mostly offsets: step by sectors there.
      return (old + BigInt(op.delta) * (width === 8 ? 512n : 1n)) & mask;
    case 'special': {
      const values = specialValues(width, old, layout);
      return values[op.which % values.length] & mask;
    }
    case 'point': {
      const target = BigInt(layout.targets[op.target % layout.targets.length]);
      return width === 8 ? (old & ~OFFSET_MASK) | target : target & mask;
    }
  }
}

function readField(bytes: Buffer, slot: Slot): bigint {
  return BigInt('0x' + (bytes.subarray(slot.offset, slot.offset + slot.width).toString('hex') || '0'));
}

function writeField(bytes: Buffer, slot: Slot, value: bigint): void {
  Buffer.from(value.toString(16).padStart(slot.width * 2, '0'), 'hex').copy(bytes, slot.offset);
}

/** The slot `index` picks in `region`. */
function pickSlot(layout: Layout, region: RegionName, index: number): Slot {
  const slots = layout.regions.get(region)!;
  return slots[index % slots.length];
}

function editOf(bytes: Buffer, offset: number, width: number, change: () => void, what: string): Edit {
  const before = bytes.subarray(offset, offset + width).toString('hex');
  change();
  return { offset, before, after: bytes.subarray(offset, offset + width).toString('hex'), what };
}

/** Where a truncation cuts: a structure boundary (± a little), or anywhere in the file. */
function truncationPoint(layout: Layout, m: { at: number; boundary: boolean }): number {
  if (!m.boundary) return m.at % (layout.fileSize + 1);
  const base = layout.boundaries[m.at % layout.boundaries.length];
  const nudge = [0, -1, 1, -8, 8, -512][Math.floor(m.at / layout.boundaries.length) % 6];
  return Math.max(0, Math.min(layout.fileSize, base + nudge));
}

/** Apply `mutations` to a copy of `pristine`: field and byte edits in order, then the shortest truncation. */
export function resolveMutations(pristine: Buffer, layout: Layout, mutations: readonly Mutation[]): MutatedImage {
  const bytes = Buffer.from(pristine);
  const edits: Edit[] = [];
  let truncatedTo: number | undefined;
  for (const m of mutations) {
    switch (m.kind) {
      case 'field': {
        const slot = pickSlot(layout, m.region, m.index);
        const value = applyOp(m.value, readField(bytes, slot), slot.width, layout);
        edits.push(editOf(bytes, slot.offset, slot.width, () => writeField(bytes, slot, value), `${m.region} field`));
        break;
      }
      case 'byte': {
        const slot = pickSlot(layout, m.region, m.index);
        const at = slot.offset + (Math.floor(m.index / 7) % slot.width);
        edits.push(editOf(bytes, at, 1, () => (bytes[at] = m.byte), `${m.region} byte`));
        break;
      }
      case 'flip': {
        const at = m.at % bytes.length;
        edits.push(editOf(bytes, at, 1, () => (bytes[at] ^= 1 << m.bit), 'bit flip'));
        break;
      }
      case 'copy': {
        const from = pickSlot(layout, m.from, m.fromIndex).offset;
        const to = pickSlot(layout, m.to, m.toIndex).offset;
        const length = Math.min(m.length, bytes.length - from, bytes.length - to);
        edits.push(editOf(bytes, to, length, () => bytes.copyWithin(to, from, from + length), `${m.from} bytes at ${from} copied over ${m.to}`));
        break;
      }
      case 'zero': {
        const at = pickSlot(layout, m.region, m.index).offset;
        const length = Math.min(m.length, bytes.length - at);
        edits.push(editOf(bytes, at, length, () => bytes.fill(0, at, at + length), `${m.region} zeroed`));
        break;
      }
      case 'truncate':
        truncatedTo = Math.min(truncatedTo ?? Infinity, truncationPoint(layout, m));
        break;
    }
  }
  return truncatedTo === undefined ? { bytes, edits } : { bytes: bytes.subarray(0, truncatedTo), edits, truncatedTo };
}

/** The concrete changes, one per line, so that a failing case can be rebuilt by hand. */
export function describeMutated(image: MutatedImage): string {
  const hex = (text: string) => (text.length > 64 ? `${text.slice(0, 64)}… (${text.length / 2} bytes)` : text);
  const lines = image.edits.map((e) => `  ${e.what} at ${e.offset} (0x${e.offset.toString(16)}): ${hex(e.before)} -> ${hex(e.after)}`);
  if (image.truncatedTo !== undefined) lines.push(`  file truncated to ${image.truncatedTo} bytes`);
  return lines.join('\n');
}
