/** The workload of `qemu-img bench`: COUNT requests of SIZE bytes, DEPTH at a time, stepping through the disk. */
import { check } from '../errors.js';
import type { Image } from '../image.js';
import { allocAligned } from '../native.js';

export interface BenchOptions {
  /** Requests to send (qemu-img's default 75000). */
  count: number;
  /** Requests in flight at once (default 64). */
  depth: number;
  /** Bytes per request (default 4096). */
  size: number;
  /** Distance between the offsets of consecutive requests (default: `size`). */
  step: number;
  /** Offset of the first request (default 0). */
  offset: number;
  /** Write instead of read. */
  write: boolean;
  /** The byte writes are filled with (default 0). */
  pattern: number;
  /** For writes: flush whenever the number of requests still to send is a multiple of this (0: never). */
  flushInterval: number;
  /** Wait for the requests in flight before each flush (default true). */
  drain: boolean;
  /** Called with each request's offset as it is sent, for tests and tracing. */
  onRequest?: (offset: number) => void;
}

export interface BenchResult {
  /** Requests completed. */
  requests: number;
  flushes: number;
  seconds: number;
}

/**
 * The offset after `offset`: one step on, wrapped to the start of the disk by the disk size.
 * (The first offset is used as given, so a first offset past the end makes the requests fail.)
 */
export function nextBenchOffset(offset: number, step: number, diskSize: number): number {
  return diskSize > 0 ? (offset + step) % diskSize : offset + step;
}

/** Fill in qemu-img's defaults for the options left out. */
export function benchDefaults(options: Partial<BenchOptions>): BenchOptions {
  const size = options.size ?? 4096;
  return {
    count: options.count ?? 75000,
    depth: options.depth ?? 64,
    size,
    step: options.step || size,
    offset: options.offset ?? 0,
    write: options.write ?? false,
    pattern: options.pattern ?? 0,
    flushInterval: options.flushInterval ?? 0,
    drain: options.drain ?? true,
    onRequest: options.onRequest,
  };
}

function checkBenchOptions(o: BenchOptions): void {
  const natural = (value: number, what: string, min: number) =>
    check(Number.isSafeInteger(value) && value >= min, `bench: ${what} must be an integer >= ${min}, got ${value}`);
  natural(o.count, 'count', 0);
  natural(o.depth, 'depth', 1);
  natural(o.size, 'size', 0);
  natural(o.step, 'step', 0);
  natural(o.offset, 'offset', 0);
  natural(o.flushInterval, 'flushInterval', 0);
  check(Number.isInteger(o.pattern) && o.pattern >= 0 && o.pattern <= 255, `bench: pattern must be a byte, got ${o.pattern}`);
  check(o.write || o.flushInterval === 0, 'bench: a flush interval is only available in write tests');
  check(o.flushInterval === 0 || o.flushInterval >= o.depth, `bench: flush interval ${o.flushInterval} is smaller than depth ${o.depth}`);
}

/**
 * Run the benchmark on `image`: the first failing request stops it (requests already in flight
 * finish) and its error is thrown.
 */
export async function bench(image: Image, options: Partial<BenchOptions> = {}): Promise<BenchResult> {
  const o = benchDefaults(options);
  checkBenchOptions(o);
  const slots = Math.max(1, Math.min(o.depth, o.count));
  const memory = allocAligned(Math.max(1, o.size) * slots);
  if (o.write) memory.fill(o.pattern);
  let nextOffset = o.offset;
  let remaining = o.count;
  let done = 0;
  let flushes = 0;
  let failure: unknown;
  /** A drained flush in progress, which every worker waits for before sending more. */
  let barrier: Promise<void> | undefined;
  let inFlight = 0;
  let idle: (() => void) | undefined;

  const flushDue = () => o.flushInterval > 0 && remaining > 0 && remaining < o.count && remaining % o.flushInterval === 0;
  const flush = async () => {
    flushes++;
    await image.flush();
  };
  const drainedFlush = async () => {
    while (inFlight > 0) await new Promise<void>((resolve) => (idle = resolve));
    await flush();
  };
  /** The `remaining` count of the last flush, so that one point in the run flushes once. */
  let flushedAt = -1;

  async function worker(slot: number): Promise<void> {
    const buffer = memory.subarray(slot * o.size, (slot + 1) * o.size);
    while (failure === undefined) {
      if (barrier) {
        await barrier;
        continue;
      }
      if (remaining === 0) return;
      if (flushDue() && flushedAt !== remaining) {
        flushedAt = remaining;
        if (o.drain) {
          barrier = drainedFlush().finally(() => (barrier = undefined));
          await barrier;
        } else {
          await flush();
        }
        continue;
      }
      const offset = nextOffset;
      nextOffset = nextBenchOffset(offset, o.step, image.size);
      remaining--;
      o.onRequest?.(offset);
      inFlight++;
      try {
        await (o.write ? image.write(buffer, offset) : image.read(buffer, offset));
        done++;
      } catch (error) {
        failure ??= error;
      } finally {
        if (--inFlight === 0) idle?.();
      }
    }
  }

  const start = process.hrtime.bigint();
  const results = await Promise.allSettled(Array.from({ length: slots }, (_, slot) => worker(slot)));
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  for (const r of results) if (r.status === 'rejected') failure ??= r.reason;
  if (failure !== undefined) throw failure;
  return { requests: done, flushes, seconds };
}
