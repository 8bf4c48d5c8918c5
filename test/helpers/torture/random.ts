/** Seeded randomness for the crash torture: every sequence and kill moment follows from one number. */

export { random } from '../random.js';

/** A seed derived from others, so that each lane, round and operation has its own stream. */
export function deriveSeed(...parts: number[]): number {
  let h = 0x811c9dc5;
  for (const part of parts) {
    h = Math.imul(h ^ (part >>> 0), 0x01000193) >>> 0;
    h = Math.imul(h ^ (h >>> 15), 0x2c1b3c6d) >>> 0;
  }
  return h;
}

/** An integer in [0, n). */
export function below(rnd: () => number, n: number): number {
  return Math.floor(rnd() * n);
}

/**
 * Deterministic bytes for a write. With `compressible`, each 512-byte sector repeats a 16-byte
 * pattern of its own, so that compressed writes really shrink and every sector still differs.
 */
export function dataBytes(length: number, seed: number, compressible = false): Buffer {
  const words = new Uint32Array(Math.ceil(length / 4));
  let x = seed >>> 0 || 1;
  const next = () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>>= 0);
  };
  if (!compressible) {
    for (let i = 0; i < words.length; i++) words[i] = next();
  } else {
    let sectorWord = 0;
    for (let i = 0; i < words.length; i++) {
      if (i % 128 === 0) sectorWord = next();
      words[i] = sectorWord ^ Math.imul((i % 4) + 1, 0x9e3779b1);
    }
  }
  return Buffer.from(words.buffer, 0, length);
}
