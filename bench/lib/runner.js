'use strict';
/** A tiny in-process benchmark runner: warm-up iterations, timed iterations, median, ops/s. */
const { median } = require('./stats.js');

/**
 * Time `fn` (sync or async; one call = one iteration doing `ops` operations and moving `bytes` bytes).
 * Resolves { name, iterations, medianMs, minMs, opsPerSec, bytesPerSec } or { name, error } when it throws.
 */
async function measure(def, defaults = {}) {
  const warmup = def.warmup ?? defaults.warmup ?? 2;
  const iterations = def.iterations ?? defaults.iterations ?? 10;
  const ops = def.ops ?? 1;
  try {
    for (let i = 0; i < warmup; i++) await def.fn();
    const times = [];
    for (let i = 0; i < iterations; i++) {
      const start = process.hrtime.bigint();
      await def.fn();
      times.push(Number(process.hrtime.bigint() - start) / 1e6);
    }
    const medianMs = median(times);
    return {
      name: def.name,
      iterations,
      medianMs,
      minMs: Math.min(...times),
      opsPerSec: (ops / medianMs) * 1000,
      bytesPerSec: def.bytes ? (def.bytes / medianMs) * 1000 : NaN,
    };
  } catch (error) {
    return { name: def.name, error: error instanceof Error ? error.message : String(error) };
  }
}

/** Run `fn(index)` `total` times with at most `depth` calls in flight. */
async function inFlight(total, depth, fn) {
  let next = 0;
  const worker = async () => {
    while (next < total) await fn(next++);
  };
  await Promise.all(Array.from({ length: Math.min(depth, total) }, worker));
}

/** A deterministic pseudo-random generator (xorshift32) so runs read the same offsets. */
function prng(seed = 0x9e3779b9) {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
}

/** `count` random offsets, multiples of `align`, such that [offset, offset + length) lies inside `size`. */
function randomOffsets(count, size, length, align, seed) {
  const random = prng(seed);
  const slots = Math.floor((size - length) / align) + 1;
  return Float64Array.from({ length: count }, () => Math.floor(random() * slots) * align);
}

module.exports = { measure, inFlight, prng, randomOffsets };
