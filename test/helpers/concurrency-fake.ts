/**
 * An in-memory disk that runs requests concurrently (each sector applied atomically, the sectors
 * of a request in random turns) and can be made faulty, so that the concurrency proof shows it
 * passes a correct disk and catches torn sectors, lost writes and ignored discards.
 */
import { DiskGeometry, changedSectors } from './concurrency-model.js';
import { random } from './random.js';
import type { ProvedImage } from './concurrency-run.js';

/** A fault the fake disk can have. */
export type Fault = 'none' | 'torn-write' | 'lost-write' | 'ignored-discard' | 'torn-read';

/** The in-memory disk; `fault` says what it gets wrong. */
export class FakeDisk implements ProvedImage {
  readonly bytes: Buffer;
  #rnd: () => number;
  #writes = 0;
  /** Bytes per model sector: the unit the disk applies atomically. */
  #unit: number;

  constructor(
    readonly geometry: DiskGeometry,
    readonly fault: Fault,
    seed: number,
    initial: Buffer,
  ) {
    this.bytes = Buffer.from(initial);
    this.#unit = geometry.sectorSize;
    this.#rnd = random(seed);
  }

  /** Let other requests run for a few turns of the event loop. */
  async #yield(): Promise<void> {
    const turns = Math.floor(this.#rnd() * 3);
    for (let i = 0; i <= turns; i++) await new Promise((resolve) => setImmediate(resolve));
  }

  async read(buffer: Uint8Array, offset: number): Promise<void> {
    const out = Buffer.from(buffer.buffer, buffer.byteOffset, buffer.byteLength);
    for (let at = 0; at < out.length; at += this.#unit) {
      await this.#yield();
      if (this.fault === 'torn-read') {
        this.bytes.copy(out, at, offset + at, offset + at + this.#unit / 2);
        await this.#yield();
        this.bytes.copy(out, at + this.#unit / 2, offset + at + this.#unit / 2, offset + at + this.#unit);
      } else {
        this.bytes.copy(out, at, offset + at, offset + at + this.#unit);
      }
    }
  }

  async write(buffer: Uint8Array, offset: number): Promise<void> {
    const data = Buffer.from(buffer.buffer, buffer.byteOffset, buffer.byteLength);
    const n = ++this.#writes;
    if (this.fault === 'lost-write' && n % 50 === 0) return;
    await this.#apply(offset / this.#unit, data.length / this.#unit, (s, at) => {
      const end = this.fault === 'torn-write' && n % 50 === 0 && at === 0 ? this.#unit / 2 : this.#unit;
      data.copy(this.bytes, s * this.#unit, at, at + end);
    });
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.#apply(offset / this.#unit, length / this.#unit, (s) => this.bytes.fill(0, s * this.#unit, (s + 1) * this.#unit));
  }

  async discard(offset: number, length: number): Promise<void> {
    if (this.fault === 'ignored-discard') return;
    const range = changedSectors({ id: 0, kind: 'discard', sector: offset / this.#unit, count: length / this.#unit }, this.geometry);
    if (!range) return;
    await this.#apply(range.first, range.end - range.first, (s) => this.bytes.fill(0, s * this.#unit, (s + 1) * this.#unit));
  }

  async flush(): Promise<void> {
    await this.#yield();
  }

  /** Apply `count` sectors from `first` in random turns, each sector at once. */
  async #apply(first: number, count: number, put: (sector: number, at: number) => void): Promise<void> {
    const order = Array.from({ length: count }, (_, i) => i);
    for (let i = order.length - 1; i > 0; i--) {
      const j = Math.floor(this.#rnd() * (i + 1));
      [order[i], order[j]] = [order[j], order[i]];
    }
    for (const i of order) {
      await this.#yield();
      put(first + i, i * this.#unit);
    }
  }
}
