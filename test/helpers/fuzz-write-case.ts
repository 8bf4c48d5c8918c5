/**
 * The write side of a fuzz case, run in the fuzz child: qemu-img check and our check judge the
 * mutated image, the image is opened writable and gets writes, zero writes, discards, flushes and
 * resizes, qemu-img check judges it again, and our `check -r all` repairs it. An image qemu-img
 * check found free of corruption must stay so; when every request succeeded, qemu reads back
 * exactly what was written; our check never calls clean what qemu-img check calls corrupt; and an
 * image our repair calls clean is clean for qemu-img check too.
 */
import { execFile } from 'node:child_process';
import { open as openFile } from 'node:fs/promises';

import fc from 'fast-check';

import { CheckResult, Image, Qcow2OpenOptions, allocAligned, check, open, resizeImage } from '../../ts/index.js';

/** One request on the writable image. Positions are fractions (of 2^32) of the window the requests stay in. */
export interface WriteOp {
  kind: 'write' | 'zero' | 'zero-unmap' | 'discard' | 'flush' | 'grow' | 'shrink';
  at: number;
  length: number;
  /** Whole 512-byte sectors, or any bytes. */
  aligned: boolean;
  /** The byte a write fills its buffer with (never 0, so that it differs from a zero write). */
  fill: number;
}

/** Requests stay in the first 8 MiB of the disk, so that the model stays small whatever size a header claims. */
const WINDOW = 8 << 20;
/** The largest request: two 64 KiB clusters and a bit, so requests cross clusters and L2 slices. */
const MAX_LENGTH = 160 << 10;
/** qemu-img runs longer than this only on a qemu hang: the case's own limit is what reports it. */
const QEMU_TIMEOUT_MS = 60_000;

/** A sequence of requests for one case: mostly writes, zero writes and discards, with flushes and resizes among them. */
export const writeOpsArbitrary: fc.Arbitrary<WriteOp[]> = fc.array(
  fc.record({
    kind: fc.constantFrom<WriteOp['kind']>('write', 'write', 'write', 'zero', 'zero-unmap', 'discard', 'flush', 'grow', 'shrink'),
    at: fc.nat({ max: 2 ** 32 - 1 }),
    length: fc.integer({ min: 1, max: MAX_LENGTH }),
    aligned: fc.boolean(),
    fill: fc.integer({ min: 1, max: 255 }),
  }),
  { minLength: 1, maxLength: 8 },
);

/** What qemu-img check said about an image. */
export interface QemuVerdict {
  /** qemu-img could open and check it. */
  checked: boolean;
  corruptions: number;
  leaks: number;
  checkErrors: number;
  /** Exit code and message, for failure reports. */
  summary: string;
}

/** The image is readable by qemu and qemu sees no corruption and no check error (leaks are harmless). */
export function isClean(verdict: QemuVerdict): boolean {
  return verdict.checked && verdict.corruptions === 0 && verdict.checkErrors === 0;
}

/** Run qemu-img or qemu-io; resolves with the exit code (-1 when killed) and the output. */
export function runQemu(program: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(program, args, { encoding: 'utf8', timeout: QEMU_TIMEOUT_MS, maxBuffer: 1 << 26 }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === 'number' ? error.code : -1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/** `qemu-img check --output=json` of a qcow2 image. */
export async function qemuCheck(file: string): Promise<QemuVerdict> {
  const { code, stdout, stderr } = await runQemu('qemu-img', ['check', '-f', 'qcow2', '--output=json', file]);
  const summary = `exit ${code}: ${(stdout + stderr).replace(/\s+/g, ' ').trim().slice(0, 400)}`;
  let report: Record<string, unknown> | undefined;
  try {
    report = JSON.parse(stdout) as Record<string, unknown>;
  } catch {
    report = undefined;
  }
  if (!report || typeof report !== 'object') return { checked: false, corruptions: 0, leaks: 0, checkErrors: 0, summary };
  const count = (key: string) => (typeof report![key] === 'number' ? (report![key] as number) : 0);
  return { checked: true, corruptions: count('corruptions'), leaks: count('leaks'), checkErrors: count('check-errors'), summary };
}

/** Our check's result in qemu-img check's terms; a check that stopped early ("Check failed") counts as a check error. */
function verdictOf(result: CheckResult): QemuVerdict {
  const checkErrors = result.checkErrors + (result.failure !== undefined ? 1 : 0);
  return { checked: true, corruptions: result.corruptions, leaks: result.leaks, checkErrors, summary: JSON.stringify(result).slice(0, 600) };
}

/** The two checks found the same numbers of corruptions, leaks and check errors. */
function sameCounts(a: QemuVerdict, b: QemuVerdict): boolean {
  return a.corruptions === b.corruptions && a.leaks === b.leaks && a.checkErrors === b.checkErrors;
}

/** The steps of a case as the fuzz child runs them (see fuzz-child.ts). */
export interface StepRunner {
  /** Run `step`; a failure must be a Qcow2Error with a code. Returns whether it succeeded. */
  attempt(step: string, work: () => Promise<void>): Promise<boolean>;
  /** Announce a step that is not the library's (a qemu run), so that a hang is pinned on it. */
  announce(step: string): Promise<void>;
  problems: string[];
}

/** What the requests should have left in the window: bytes, and which of them are known. */
class Model {
  readonly bytes = Buffer.alloc(WINDOW);
  readonly known = new Uint8Array(WINDOW);

  set(offset: number, data: Buffer | null, length: number): void {
    if (data) data.copy(this.bytes, offset);
    else this.bytes.fill(0, offset, offset + length);
    this.known.fill(1, offset, offset + length);
  }

  forget(offset: number, length: number): void {
    this.known.fill(0, Math.min(offset, WINDOW), Math.min(offset + length, WINDOW));
  }

  /** The known bytes below `limit` as runs of one value (writes fill with one byte, zero writes with 0). */
  runs(limit: number): { offset: number; length: number; value: number }[] {
    const out: { offset: number; length: number; value: number }[] = [];
    for (let i = 0; i < Math.min(limit, WINDOW); i++) {
      if (!this.known[i]) continue;
      const last = out[out.length - 1];
      if (last && last.offset + last.length === i && last.value === this.bytes[i]) last.length++;
      else out.push({ offset: i, length: 1, value: this.bytes[i] });
    }
    return out;
  }

  /** The first offset below `limit` where `actual` differs from a known byte, or -1. */
  firstMismatch(actual: Buffer, limit: number): number {
    for (let i = 0; i < Math.min(limit, WINDOW, actual.length); i++) {
      if (this.known[i] && actual[i] !== this.bytes[i]) return i;
    }
    return -1;
  }
}

/** Where a request lands on a disk of `size` bytes: inside the window and the disk, sector aligned when asked. */
function placeOf(op: WriteOp, size: number): { offset: number; length: number } | undefined {
  const limit = Math.min(size, WINDOW);
  if (limit < 512) return undefined;
  let offset = Math.floor((op.at / 2 ** 32) * limit);
  let length = Math.min(op.length, limit - offset);
  if (op.aligned) {
    offset -= offset % 512;
    length = Math.max(512, length - (length % 512));
    if (offset + length > limit) offset = limit - length - ((limit - length) % 512);
  }
  return length > 0 && offset >= 0 ? { offset, length } : undefined;
}

/** Runs the write side of one case. */
export class WriteSide {
  readonly model = new Model();
  /** Every request and the close succeeded. */
  allSucceeded = true;
  /** At least one request that changes the image succeeded. */
  wrote = false;
  /** Our check of the mutated image found what qemu-img check found (undefined: one of them could not check it). */
  checkAgreed: boolean | undefined;
  /** When they differ: both results, for the log (the counts may differ where qemu's own are debatable). */
  checkDisagreement: string | undefined;

  constructor(
    readonly runner: StepRunner,
    readonly file: string,
    readonly options: Qcow2OpenOptions,
    readonly ops: readonly WriteOp[],
  ) {}

  /** The whole side; returns the verdicts before and after, for the parent's statistics. */
  async run(): Promise<{ before: QemuVerdict; after?: QemuVerdict; wrote: boolean }> {
    await this.runner.announce('qemu-img check (before)');
    const before = await qemuCheck(this.file);
    await this.checkLikeQemu(before);
    // qemu-img check does not look at everything qemu refuses on reading (a data file cluster off its guest offset).
    const qemuReads = isClean(before) && (await this.qemuReadsWindow());
    let image: Image | undefined;
    await this.runner.attempt('open writable', async () => {
      image = await open(this.file, { ...this.options, readOnly: false });
    });
    if (!image) return { before, wrote: false };
    await this.apply(image, isClean(before));
    this.allSucceeded = (await this.runner.attempt('close after writing', () => image!.close())) && this.allSucceeded;
    await this.runner.announce('qemu-img check (after)');
    const after = await qemuCheck(this.file);
    if (isClean(before) && !isClean(after)) {
      this.runner.problems.push(`qemu-img check found the image clean before (${before.summary}) and not after our requests (${after.summary})`);
    }
    if (qemuReads && this.allSucceeded && this.wrote) await this.readBackWithQemu(image.size);
    if (after.checked) await this.repairAll();
    return { before, after, wrote: this.wrote };
  }

  /** Our check of the mutated image: an image qemu-img check calls corrupt is never called clean. */
  async checkLikeQemu(qemu: QemuVerdict): Promise<void> {
    let result: CheckResult | undefined;
    await this.runner.attempt('check', async () => {
      result = await check(this.file, { format: 'qcow2' });
    });
    if (!result || !qemu.checked) return;
    const ours = verdictOf(result);
    this.checkAgreed = sameCounts(ours, qemu);
    if (!this.checkAgreed) this.checkDisagreement = `qemu-img check: ${qemu.summary}\nour check: ${ours.summary}`;
    if (qemu.corruptions > 0 && ours.corruptions === 0 && ours.checkErrors === 0) {
      this.runner.problems.push(`qemu-img check finds corruption (${qemu.summary}), our check finds none: ${ours.summary}`);
    }
  }

  /** check -r all; when it calls the result clean, qemu-img check must agree. */
  async repairAll(): Promise<void> {
    let result: CheckResult | undefined;
    await this.runner.attempt('check -r all', async () => {
      result = await check(this.file, { format: 'qcow2', repair: 'all' });
    });
    if (!result) return;
    const ours = verdictOf(result);
    if (ours.corruptions + ours.leaks + ours.checkErrors > 0) return;
    await this.runner.announce('qemu-img check (after our repair)');
    const qemu = await qemuCheck(this.file);
    if (!qemu.checked || qemu.corruptions + qemu.leaks + qemu.checkErrors > 0) {
      this.runner.problems.push(`check -r all calls the image clean (${ours.summary}), qemu-img check does not: ${qemu.summary}`);
    }
  }

  async apply(image: Image, clean: boolean): Promise<void> {
    for (const [i, op] of this.ops.entries()) {
      const ok = await this.attemptOp(image, op, `request ${i + 1} of ${this.ops.length}`);
      this.allSucceeded &&= ok;
    }
    if (clean && this.allSucceeded) await this.runner.attempt('read back what was written', () => this.readBack(image));
  }

  /** One request; on failure the bytes it covered are no longer known. */
  async attemptOp(image: Image, op: WriteOp, label: string): Promise<boolean> {
    if (op.kind === 'flush') return this.runner.attempt(`${label}: flush`, () => image.flush());
    if (op.kind === 'grow' || op.kind === 'shrink') return this.resize(image, op, label);
    const place = placeOf(op, image.size);
    if (!place) return true;
    const { offset, length } = place;
    const step = `${label}: ${op.kind} ${offset}+${length}`;
    const data = op.kind === 'write' ? Buffer.alloc(length, op.fill) : null;
    const ok = await this.runner.attempt(step, async () => {
      if (op.kind === 'write') await image.write(data!, offset);
      else if (op.kind === 'discard') await image.discard(offset, length);
      else await image.writeZeroes(offset, length, { unmap: op.kind === 'zero-unmap' });
    });
    if (ok && op.kind !== 'discard') this.model.set(offset, data, length);
    else this.model.forget(offset, length);
    this.wrote ||= ok;
    return ok;
  }

  /** Grow or shrink by up to 1 MiB (whole sectors); what lies past the old end is unknown. */
  async resize(image: Image, op: WriteOp, label: string): Promise<boolean> {
    const delta = Math.max(512, Math.floor((op.length * 8) / 512) * 512);
    const target = op.kind === 'grow' ? image.size + delta : image.size - delta;
    if (target < 512 || !Number.isSafeInteger(target)) return true;
    const from = Math.min(image.size, target);
    const ok = await this.runner.attempt(`${label}: resize ${image.size} -> ${target}`, async () => {
      await resizeImage(image, target, { shrink: op.kind === 'shrink' });
    });
    this.model.forget(from, WINDOW);
    this.wrote ||= ok;
    return ok;
  }

  /** The same session reads back every known byte. */
  async readBack(image: Image): Promise<void> {
    const limit = Math.min(image.size, WINDOW);
    const actual = allocAligned(Math.max(limit, 4096)).subarray(0, limit);
    await image.read(actual, 0);
    const at = this.model.firstMismatch(actual, limit);
    if (at >= 0) this.runner.problems.push(`read back in the same session: byte ${at} is ${actual[at]}, ${this.model.bytes[at]} was written`);
  }

  /** qemu reads the window of the image as it is before the requests without an error. */
  async qemuReadsWindow(): Promise<boolean> {
    const header = Buffer.alloc(32);
    const file = await openFile(this.file, 'r');
    try {
      await file.read(header, 0, 32, 0);
    } finally {
      await file.close();
    }
    const size = Math.min(Number(header.readBigUInt64BE(24)), WINDOW);
    await this.runner.announce('qemu-io read (before)');
    const { code, stdout, stderr } = await runQemu('qemu-io', ['-r', '-f', 'qcow2', '-c', `read -q 0 ${size}`, this.file]);
    return code === 0 && !/fail|error/i.test(stdout + stderr);
  }

  /**
   * qemu, the oracle, reads every known byte after close: only those, since the rest of the image
   * may hold data the mutation broke (compressed data qemu-img check does not decode).
   */
  async readBackWithQemu(size: number): Promise<void> {
    const commands = this.model.runs(size).flatMap((r) => ['-c', `read -q -P ${r.value} ${r.offset} ${r.length}`]);
    if (commands.length === 0) return;
    await this.runner.announce('qemu-io read back');
    const { code, stdout, stderr } = await runQemu('qemu-io', ['-r', '-f', 'qcow2', ...commands, this.file]);
    if (code !== 0 || /fail|error/i.test(stdout + stderr)) {
      this.runner.problems.push(`qemu-io does not read back what was written: exit ${code}: ${(stdout + stderr).trim().slice(0, 1000)}`);
    }
  }
}
