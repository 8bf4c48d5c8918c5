/**
 * The concurrency proof's driver: seeded epochs of random reads, writes, zero writes, discards
 * and flushes on overlapping ranges, many in flight at once through the library API, each read
 * checked against the sector model; at the end of every epoch (a flush point) the whole disk is
 * read, checked and adopted as the settled state.
 */
import type { Image } from '../../ts/index.js';
import { DiskGeometry, Mismatch, Op, OpKind, SectorModel, writeData } from './concurrency-model.js';
import { random } from './random.js';

/** What the proof needs of an image. */
export type ProvedImage = Pick<Image, 'read' | 'write' | 'writeZeroes' | 'discard' | 'flush'> & {
  /** Whole clusters written compressed (qcow2 only); without it the run has no compressed writes. */
  writeCompressed?(buffer: Uint8Array, offset: number): Promise<void>;
};

/** Relative weights of the kinds of operation. */
export type OpMix = Record<OpKind, number>;

/** A third reads, a third writes (a few compressed), the rest zero writes and discards, and a few flushes. */
export const DEFAULT_MIX: OpMix = { read: 34, write: 30, compressed: 4, zero: 14, discard: 14, flush: 4 };

/** How one run goes. */
export interface RunPlan {
  /** The kinds of operation (default DEFAULT_MIX). */
  mix?: OpMix;
  seed: number;
  /** Operations in all (about; the last epoch is cut short). */
  operations: number;
  /** Requests in flight at once. */
  depth: number;
}

/** Figures of a finished run, for the test's log. */
export interface RunStats {
  epochs: number;
  byKind: Record<OpKind, number>;
  /** The most requests seen in flight at once. */
  maxInflight: number;
  /** Reads that ran while a changing operation overlapping them was in flight. */
  racingReads: number;
}

/** A failure of the proof; the message names the seed and the operations on the bad sector. */
export class ProofFailure extends Error {
  constructor(
    message: string,
    /** The model sector that held what it should not, when the failure is one. */
    readonly sector?: number,
  ) {
    super(message);
  }
}

/** Random operations of one epoch, half of them in a window of a few clusters so that they overlap. */
export class OpSource {
  #rnd: () => number;
  #nextId = 1;

  constructor(
    seed: number,
    readonly geometry: DiskGeometry,
    readonly mix: OpMix,
  ) {
    this.#rnd = random(seed);
  }

  #int(n: number): number {
    return Math.floor(this.#rnd() * n);
  }

  /** The operations of one epoch of `count`. */
  epoch(count: number): Op[] {
    const sectors = this.geometry.size / this.geometry.sectorSize;
    const cs = this.geometry.clusterSize / this.geometry.sectorSize;
    const windowLength = Math.min(sectors, Math.max(4 * cs, 64));
    const windowStart = this.#int(sectors - windowLength + 1);
    const ops: Op[] = [];
    for (let i = 0; i < count; i++) {
      const hot = this.#rnd() < 0.6;
      let sector = hot ? windowStart + this.#int(windowLength) : this.#int(sectors);
      const shape = this.#rnd();
      let length: number;
      if (shape < 0.45) {
        length = 1 + this.#int(cs);
      } else if (shape < 0.8) {
        length = 1 + this.#int(3 * cs);
      } else {
        sector -= sector % cs;
        length = cs * (1 + this.#int(4));
      }
      const kind = this.#kind();
      if (kind === 'compressed') {
        // Whole clusters only; the last one may end at the disk end.
        sector -= sector % cs;
        length = cs * (1 + this.#int(2));
      }
      length = Math.min(length, sectors - sector);
      ops.push({ id: this.#nextId++, kind, sector, count: length });
      if (kind === 'zero') ops[i].unmap = this.#rnd() < 0.5;
    }
    return ops;
  }

  #kind(): OpKind {
    const kinds = Object.keys(this.mix) as OpKind[];
    let roll = this.#rnd() * kinds.reduce((sum, k) => sum + this.mix[k], 0);
    for (const kind of kinds) {
      roll -= this.mix[kind];
      if (roll < 0) return kind;
    }
    return kinds[kinds.length - 1];
  }
}

function describeOp(op: Op, sectorSize: number): string {
  const bytes = `${op.sector * sectorSize}+${op.count * sectorSize}`;
  return `${op.kind}${op.unmap ? ' unmap' : ''} #${op.id} sectors ${op.sector}+${op.count} (bytes ${bytes})`;
}

/** Runs epochs of random operations against `image` and the model. */
export class ConcurrencyRun {
  readonly model: SectorModel;
  readonly stats: RunStats = {
    epochs: 0,
    byKind: { read: 0, write: 0, compressed: 0, zero: 0, discard: 0, flush: 0 },
    maxInflight: 0,
    racingReads: 0,
  };
  #source: OpSource;
  #inflight = 0;
  #changing = new Map<number, Op>();
  /** Changing operations and flushes in flight, so that a failure can wait for them to settle. */
  #pending = new Map<number, Promise<void>>();
  #completed = new Set<number>();
  #epochOps: Op[] = [];
  /** The id of the last operation issued (ids grow in the order operations are issued). */
  #issued = 0;
  /** Set by the first failure, so that the other workers take no more operations. */
  #stopped = false;

  constructor(
    readonly image: ProvedImage,
    readonly geometry: DiskGeometry,
    readonly plan: RunPlan,
    initial: Buffer,
  ) {
    this.model = new SectorModel(geometry, plan.seed, initial);
    const mix = { ...(plan.mix ?? DEFAULT_MIX) };
    if (!image.writeCompressed) {
      mix.write += mix.compressed;
      mix.compressed = 0;
    }
    this.#source = new OpSource(plan.seed, geometry, mix);
  }

  /** Run every epoch; throws a ProofFailure naming the seed on the first disagreement. Returns the last full read of the disk. */
  async run(): Promise<Buffer> {
    let last = await this.#flushPoint();
    const rnd = random(this.plan.seed ^ 0x5bd1e995);
    for (let done = 0; done < this.plan.operations; ) {
      const count = Math.min(this.plan.operations - done, 100 + Math.floor(rnd() * 300));
      this.#epochOps = this.#source.epoch(count);
      await this.#runEpoch(this.#epochOps);
      last = await this.#flushPoint();
      this.stats.epochs++;
      done += count;
    }
    return last;
  }

  async #runEpoch(ops: Op[]): Promise<void> {
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < ops.length && !this.#stopped) await this.#runOp(ops[next++]);
    };
    await Promise.all(Array.from({ length: this.plan.depth }, worker));
  }

  async #runOp(op: Op): Promise<void> {
    this.#issued = op.id;
    this.stats.byKind[op.kind]++;
    this.#inflight++;
    this.stats.maxInflight = Math.max(this.stats.maxInflight, this.#inflight);
    const running = op.kind === 'read' ? this.#read(op) : op.kind === 'flush' ? this.image.flush() : this.#change(op);
    // Not reads: a failing read waits for the others, and two failing reads must not wait for each other.
    if (op.kind !== 'read') this.#pending.set(op.id, running);
    try {
      await running;
      this.#completed.add(op.id);
    } catch (error) {
      if (error instanceof ProofFailure) throw error;
      throw this.#failure(`${describeOp(op, this.geometry.sectorSize)} failed: ${(error as Error).stack ?? String(error)}`);
    } finally {
      this.#pending.delete(op.id);
      this.#inflight--;
    }
  }

  async #read(op: Op): Promise<void> {
    const data = Buffer.alloc(op.count * this.geometry.sectorSize);
    const racing = [...this.#changing.values()].some((c) => c.sector < op.sector + op.count && op.sector < c.sector + c.count);
    if (racing) this.stats.racingReads++;
    const ticket = this.model.beginRead(op);
    await this.image.read(data, op.sector * this.geometry.sectorSize);
    const bad = this.model.checkRead(ticket, data);
    if (bad) throw await this.#readFailure(bad);
  }

  /** A bad read, with what the sector holds once the requests in flight have settled: a stale read, or a lost write? */
  async #readFailure(bad: Mismatch): Promise<ProofFailure> {
    this.#stopped = true;
    const when = this.#opsOver(bad.sector);
    await Promise.allSettled(this.#pending.values());
    return this.#failure(bad, `once the requests in flight settled, it reads as ${await this.#reread(bad.sector)}`, when);
  }

  /** The changing operations issued this epoch over a sector, each said completed or in flight now. */
  #opsOver(s: number): string {
    const touching = this.#epochOps.filter(
      (op) => op.id <= this.#issued && op.kind !== 'read' && op.kind !== 'flush' && op.sector <= s && s < op.sector + op.count,
    );
    const listed = touching.map((op) => {
      const state = this.#completed.has(op.id) ? 'completed' : 'in flight';
      return `${describeOp(op, this.geometry.sectorSize)} ${state}`;
    });
    return `operations of this epoch over sector ${s}, when the failure was seen: ${listed.join('; ') || 'none'}`;
  }

  /** What a fresh read of one model sector returns, described. */
  async #reread(sector: number): Promise<string> {
    const unit = this.geometry.sectorSize;
    const bytes = Buffer.alloc(unit);
    try {
      await this.image.read(bytes, sector * unit);
    } catch (error) {
      return `(the read failed: ${String(error)})`;
    }
    return this.model.describe(sector, bytes);
  }

  async #change(op: Op): Promise<void> {
    const data = op.kind === 'write' || op.kind === 'compressed' ? writeData(op, this.plan.seed, this.geometry.sectorSize) : undefined;
    this.model.beginChange(op, data);
    this.#changing.set(op.id, op);
    const offset = op.sector * this.geometry.sectorSize;
    const length = op.count * this.geometry.sectorSize;
    if (op.kind === 'compressed') await this.image.writeCompressed!(data!, offset);
    else if (data) await this.image.write(data, offset);
    else if (op.kind === 'zero') await this.image.writeZeroes(offset, length, { unmap: op.unmap });
    else await this.image.discard(offset, length);
    this.#changing.delete(op.id);
    this.model.completeChange(op);
  }

  /** With nothing in flight: flush, read the whole disk, check it and adopt it. */
  async #flushPoint(): Promise<Buffer> {
    const disk = Buffer.alloc(this.geometry.size);
    try {
      await this.image.flush();
      await this.image.read(disk, 0);
    } catch (error) {
      throw this.#failure(`the flush point failed: ${(error as Error).stack ?? String(error)}`);
    }
    const bad = this.model.settle(disk);
    if (bad) throw this.#failure(bad, `read again, it holds ${await this.#reread(bad.sector)}`);
    return disk;
  }

  /** The failure of a run: the seed, and the changing operations over the bad sector (`ops`, when listed earlier). */
  #failure(bad: Mismatch | string, afterwards?: string, ops?: string): ProofFailure {
    this.#stopped = true;
    const message = typeof bad === 'string' ? bad : bad.message;
    const lines = [`seed ${this.plan.seed}, depth ${this.plan.depth}, epoch ${this.stats.epochs}: ${message}`];
    if (afterwards) lines.push(afterwards);
    if (typeof bad !== 'string') lines.push(ops ?? this.#opsOver(bad.sector));
    lines.push(`reproduce: QCOW2_CONCURRENCY_SEED=${this.plan.seed} (the operations follow from the seed)`);
    return new ProofFailure(lines.join('\n'), typeof bad === 'string' ? undefined : bad.sector);
  }
}
