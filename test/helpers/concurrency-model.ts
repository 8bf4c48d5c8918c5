/**
 * The in-memory model of the concurrency proof: for every 512-byte sector, the contents it may
 * hold given the operations completed and in flight. Operations in flight at once have no order,
 * so a sector may hold any of them; a content no candidate allows (a torn sector, stale data, a
 * lost write) is an error.
 */

/** The sector of qemu-io and of most runs: 512 bytes. */
export const SECTOR = 512;

/** What an operation does. */
export type OpKind = 'read' | 'write' | 'compressed' | 'zero' | 'discard' | 'flush';

/** One guest operation, in the model's sectors. */
export interface Op {
  /** Unique in a run, from 1; it is written into every sector a write fills. */
  id: number;
  kind: OpKind;
  sector: number;
  count: number;
  /** For zero writes: let the image free whole clusters. */
  unmap?: boolean;
}

/** What the image is, as far as the meaning of discard goes, and the model's sector. */
export interface DiskGeometry {
  /**
   * Bytes per model sector: the unit operations are made of and that changes atomically. 512, or
   * less (at least 32, for a write's header) to prove requests that are not sector-aligned.
   */
  sectorSize: number;
  /** Virtual size in bytes (a multiple of the sector). */
  size: number;
  clusterSize: number;
  version: 2 | 3;
  hasBacking: boolean;
}

/** Marks the first word of every sector a write fills ("WRIT"). */
const WRITE_MARK = 0x57524954;

/** Names the settled content of a sector among the candidates. */
const SETTLED = 0;

/**
 * The sectors [first, end) an operation changes, or undefined when it changes none. Writes and
 * zero writes change exactly their range; a discard drops only the whole clusters inside its
 * range (the last cluster may end at the disk end) and they read as zeros afterwards, except on
 * version 2 with a backing file, where there is no zero flag and the discard changes nothing.
 */
export function changedSectors(op: Op, g: DiskGeometry): { first: number; end: number } | undefined {
  if (op.kind === 'write' || op.kind === 'compressed' || op.kind === 'zero') return { first: op.sector, end: op.sector + op.count };
  if (op.kind !== 'discard') return undefined;
  if (g.version < 3 && g.hasBacking) return undefined;
  const start = op.sector * g.sectorSize;
  const stop = start + op.count * g.sectorSize;
  const inner = Math.ceil(start / g.clusterSize) * g.clusterSize;
  const innerEnd = stop === g.size ? stop : Math.floor(stop / g.clusterSize) * g.clusterSize;
  return innerEnd > inner ? { first: inner / g.sectorSize, end: innerEnd / g.sectorSize } : undefined;
}

/**
 * The bytes a write fills, each sector naming the operation, the sector and the run's seed. A
 * compressed write's sectors repeat one byte after their header, so that they do compress.
 */
export function writeData(op: Op, seed: number, sectorSize: number): Buffer {
  const data = Buffer.alloc(op.count * sectorSize);
  for (let i = 0; i < op.count; i++) {
    const sector = data.subarray(i * sectorSize, (i + 1) * sectorSize);
    sector.writeUInt32BE(WRITE_MARK, 0);
    sector.writeUInt32BE(op.id, 4);
    sector.writeUInt32BE(op.sector + i, 8);
    sector.writeUInt32BE(seed >>> 0, 12);
    if (op.kind === 'compressed') sector.fill((op.id + i) % 255 + 1, 16);
    else fillRandom(sector, op.id, op.sector + i, seed);
  }
  return data;
}

/** The rest of a write's sector after its header: xorshift bytes that depend on the operation, the sector and the seed. */
function fillRandom(out: Buffer, opId: number, sector: number, seed: number): void {
  let x = (Math.imul(opId, 0x9e3779b1) ^ Math.imul(sector + 1, 0x85ebca6b) ^ seed) >>> 0 || 1;
  for (let i = 16; i < out.length; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out.writeUInt32BE(x, i);
  }
}

function isZero(bytes: Buffer): boolean {
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

/** A content a sector may hold: the settled one, or what a completed operation left. */
interface Candidate {
  id: number;
  /** The model clock when the operation completed (-1 for the settled content). */
  end: number;
}

/** An operation that changes sectors, as the model tracks it. */
interface Tracked {
  op: Op;
  first: number;
  end: number;
  start: number;
  /** The bytes it writes; undefined for zeros. */
  data?: Buffer;
}

/** A sector that holds a content none of its candidates allows. */
export interface Mismatch {
  sector: number;
  message: string;
}

/** A read in flight: the candidates of its sectors when it was issued. */
export interface ReadTicket {
  op: Op;
  start: number;
  candidates: number[][];
}

/** The model of one disk; not thread-aware: JS calls begin/complete in the order things happen. */
export class SectorModel {
  readonly sectors: number;
  /** Bytes per model sector. */
  readonly unit: number;
  #zero: Buffer;
  #settled: Buffer;
  #clock = 0;
  /** Per sector: contents completed operations may have left (no order among overlapping ones). */
  #done: Candidate[][];
  /** Per sector: operations in flight that change it. */
  #inflight: number[][];
  /** Changing operations since the last settle, by id. */
  #ops = new Map<number, Tracked>();

  constructor(
    readonly geometry: DiskGeometry,
    readonly seed: number,
    settled: Buffer,
  ) {
    this.unit = geometry.sectorSize;
    this.sectors = geometry.size / this.unit;
    this.#zero = Buffer.alloc(this.unit);
    this.#settled = Buffer.from(settled);
    this.#done = Array.from({ length: this.sectors }, () => [{ id: SETTLED, end: -1 }]);
    this.#inflight = Array.from({ length: this.sectors }, () => []);
  }

  /** The settled content of the whole disk (what the last settle adopted). */
  get settled(): Buffer {
    return this.#settled;
  }

  /** Note a changing operation as issued; `data` is what a write writes. */
  beginChange(op: Op, data?: Buffer): void {
    const range = changedSectors(op, this.geometry);
    if (!range) return;
    const tracked: Tracked = { op, first: range.first, end: range.end, start: this.#clock++, data };
    this.#ops.set(op.id, tracked);
    for (let s = range.first; s < range.end; s++) this.#inflight[s].push(op.id);
  }

  /** Note a changing operation as completed: it overwrote every content completed before it was issued. */
  completeChange(op: Op): void {
    const tracked = this.#ops.get(op.id);
    if (!tracked) return;
    const end = this.#clock++;
    for (let s = tracked.first; s < tracked.end; s++) {
      const flying = this.#inflight[s];
      flying.splice(flying.indexOf(op.id), 1);
      const kept = this.#done[s].filter((c) => c.end > tracked.start);
      kept.push({ id: op.id, end });
      this.#done[s] = kept;
    }
  }

  /** Note a read as issued: its sectors may show what is completed or in flight now, or anything issued before it ends. */
  beginRead(op: Op): ReadTicket {
    const candidates: number[][] = [];
    for (let s = op.sector; s < op.sector + op.count; s++) {
      candidates.push([...this.#done[s].map((c) => c.id), ...this.#inflight[s]]);
    }
    return { op, start: this.#clock++, candidates };
  }

  /** Check what a read returned; returns the first bad sector, or undefined. */
  checkRead(ticket: ReadTicket, data: Buffer): Mismatch | undefined {
    const { op } = ticket;
    const later = [...this.#ops.values()].filter((t) => t.start > ticket.start && t.first < op.sector + op.count && t.end > op.sector);
    for (let i = 0; i < op.count; i++) {
      const s = op.sector + i;
      const ids = [...ticket.candidates[i], ...later.filter((t) => t.first <= s && s < t.end).map((t) => t.op.id)];
      const bad = this.#mismatch(s, data.subarray(i * this.unit, (i + 1) * this.unit), ids);
      if (bad) return { sector: s, message: `read #${op.id} of sectors ${op.sector}+${op.count}: ${bad}` };
    }
    return undefined;
  }

  /**
   * With nothing in flight: check a read of the whole disk against what completed operations
   * may have left, then adopt it as the settled content. Returns the first bad sector, or undefined.
   */
  settle(disk: Buffer): Mismatch | undefined {
    for (let s = 0; s < this.sectors; s++) {
      if (this.#inflight[s].length > 0) return { sector: s, message: `sector ${s} has operations in flight at a flush point` };
      const bad = this.#mismatch(s, disk.subarray(s * this.unit, (s + 1) * this.unit), this.#done[s].map((c) => c.id));
      if (bad) return { sector: s, message: `flush point: ${bad}` };
    }
    disk.copy(this.#settled);
    for (let s = 0; s < this.sectors; s++) this.#done[s] = [{ id: SETTLED, end: -1 }];
    this.#ops.clear();
    return undefined;
  }

  /** Undefined when `bytes` is one of the candidates `ids` for sector `s`; else what was seen and allowed. */
  #mismatch(s: number, bytes: Buffer, ids: number[]): string | undefined {
    for (const id of ids) if (this.#content(id, s).equals(bytes)) return undefined;
    const allowed = [...new Set(ids)].map((id) => this.#describeCandidate(id)).join(', ');
    return `sector ${s} (byte ${s * this.unit}) holds ${this.describe(s, bytes)}; allowed: ${allowed}`;
  }

  #content(id: number, s: number): Buffer {
    if (id === SETTLED) return this.#settled.subarray(s * this.unit, (s + 1) * this.unit);
    const tracked = this.#ops.get(id)!;
    if (!tracked.data) return this.#zero;
    const at = (s - tracked.op.sector) * this.unit;
    return tracked.data.subarray(at, at + this.unit);
  }

  #describeCandidate(id: number): string {
    if (id === SETTLED) return 'the settled content';
    const { op } = this.#ops.get(id)!;
    return `${op.kind}${op.unmap ? ' (unmap)' : ''} #${op.id} of ${op.sector}+${op.count}`;
  }

  /** What a sector holds, half by half, so that a torn sector shows its two sources. */
  describe(s: number, bytes: Buffer): string {
    const misplaced = this.#misplaced(s, bytes);
    if (misplaced) return misplaced;
    const half = this.unit / 2;
    const first = this.#describeBytes(s, bytes.subarray(0, half), 0);
    const second = this.#describeBytes(s, bytes.subarray(half), half);
    return first === second ? first : `${first} then ${second} (torn)`;
  }

  /** A whole sector some write of this epoch wrote at another sector, if `bytes` is one. */
  #misplaced(s: number, bytes: Buffer): string | undefined {
    if (bytes.readUInt32BE(0) !== WRITE_MARK) return undefined;
    const id = bytes.readUInt32BE(4);
    const sector = bytes.readUInt32BE(8);
    const named = this.#ops.get(id);
    if (sector === s || !named?.data || sector < named.op.sector || sector >= named.op.sector + named.op.count) return undefined;
    const from = (sector - named.op.sector) * this.unit;
    if (!named.data.subarray(from, from + this.unit).equals(bytes)) return undefined;
    return `sector ${sector} of ${named.op.kind} #${id} (misplaced: it was written at sector ${sector})`;
  }

  #describeBytes(s: number, bytes: Buffer, at: number): string {
    if (isZero(bytes)) return 'zeros';
    const start = s * this.unit + at;
    if (this.#settled.subarray(start, start + bytes.length).equals(bytes)) return 'the settled content';
    for (const t of this.#ops.values()) {
      if (!t.data || t.op.sector > s || s >= t.op.sector + t.op.count) continue;
      const from = (s - t.op.sector) * this.unit + at;
      if (t.data.subarray(from, from + bytes.length).equals(bytes)) return `${t.op.kind} #${t.op.id}`;
    }
    if (at === 0 && bytes.readUInt32BE(0) === WRITE_MARK) {
      return `the start of a sector naming write #${bytes.readUInt32BE(4)} and sector ${bytes.readUInt32BE(8)}`;
    }
    return `unknown bytes ${bytes.subarray(0, 16).toString('hex')}…`;
  }
}

