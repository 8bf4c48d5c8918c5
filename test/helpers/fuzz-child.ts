/**
 * The child process of the fuzz tests: runs every read operation of the library on one (possibly
 * hostile) image per request, or with `writeOps` the write side (fuzz-write-case.ts), and reports
 * how each step ended. It runs apart from ava so that
 * a native crash or a hang is seen by the parent, which knows the case, instead of killing the
 * test worker. Protocol (IPC): FuzzRequest in; FuzzProgress while working, then FuzzReport.
 */
import { readFile } from 'node:fs/promises';
import { constants } from 'node:os';

import {
  ErrorCodes,
  Extent,
  Image,
  Qcow2Error,
  Qcow2OpenOptions,
  allocAligned,
  check,
  compareImages,
  convert,
  info,
  infoChain,
  mapImage,
  open,
} from '../../ts/index.js';
import { QemuVerdict, WriteOp, WriteSide, isClean, qemuCheck, runQemu } from './fuzz-write-case.js';

/** What to do with one image. */
export interface FuzzRequest {
  id: number;
  image: string;
  /** Follow the backing and data file names the image records. */
  follow: boolean;
  /** Where convert writes its raw output. */
  out: string;
  /** Guest bytes read, mapped and converted at most: a mutated size may be huge. */
  guestLimit: number;
  /** Open with a tiny L2 cache, so that tables are evicted and reloaded all the time. */
  tinyCache: boolean;
  /** Run the write side with these requests instead of the read side. */
  writeOps?: WriteOp[];
  /** Instead of reading the image, fail the way the harness must catch, to prove that it does. */
  selfTest?: 'crash' | 'hang' | 'uncoded error';
}

/** Sent when a step starts, so that a crash or hang can be pinned on it. */
export interface FuzzProgress {
  id: number;
  step: string;
}

/** How one step ended: `code` when it failed with a proper error. */
export interface StepOutcome {
  step: string;
  code?: string;
}

/** The result of one request: the steps, and every broken promise of the library found on the way. */
export interface FuzzReport {
  id: number;
  done: true;
  outcomes: StepOutcome[];
  /** Errors without a code, non-Qcow2Error throws, unhandled rejections, inconsistent results. */
  problems: string[];
  /** Write side: whether qemu-img check found the image clean before and after, and whether a request changed it. */
  writeSide?: { cleanBefore: boolean; cleanAfter?: boolean; wrote: boolean; checkAgreed?: boolean; checkDisagreement?: string };
}

const CHUNK = 1 << 20;

const OWN_CODES = new Set<string>(Object.values(ErrorCodes));

/** The codes a failure may carry (errors.ts): one of the package's own, or an errno name. */
function isValidCode(code: unknown): boolean {
  return typeof code === 'string' && (OWN_CODES.has(code) || code in constants.errno);
}

/** Send a message; resolves once it has left this process, so that a crash right after cannot lose it. */
function send(message: FuzzProgress | FuzzReport | { problem: string }): Promise<void> {
  return new Promise((resolve) => process.send!(message, undefined, {}, () => resolve()));
}

function describeThrown(error: unknown): string {
  if (error instanceof Error) {
    const code = (error as { code?: unknown }).code;
    return `${error.constructor.name} (code ${JSON.stringify(code)}): ${error.message}\n${error.stack ?? ''}`;
  }
  return `a non-Error value: ${String(error)}`;
}

/** Runs the steps of one request, collecting outcomes and problems. */
class CaseRun {
  readonly outcomes: StepOutcome[] = [];
  readonly problems: string[] = [];
  writeSide: FuzzReport['writeSide'];

  constructor(readonly request: FuzzRequest) {}

  /** Tell the parent a step outside the library starts (a qemu run), so that a hang is pinned on it. */
  announce(step: string): Promise<void> {
    return send({ id: this.request.id, step });
  }

  /** Run `step`; a failure must be a Qcow2Error with a non-empty code. Returns whether it succeeded. */
  async attempt(step: string, work: () => Promise<void>): Promise<boolean> {
    await send({ id: this.request.id, step });
    try {
      await work();
      this.outcomes.push({ step });
      return true;
    } catch (error) {
      const good = error instanceof Qcow2Error && isValidCode(error.code);
      if (!good) this.problems.push(`${step} threw something other than a Qcow2Error with a package code or an errno name: ${describeThrown(error)}`);
      this.outcomes.push({ step, code: good ? error.code : 'BAD' });
      return false;
    }
  }

  async run(): Promise<void> {
    if (this.request.selfTest) return this.failOnPurpose(this.request.selfTest);
    const { image: file, follow, tinyCache } = this.request;
    const options: Qcow2OpenOptions = { readOnly: true, followFileNames: follow, ...(tinyCache ? { l2CacheSize: 4096, l2SliceSize: 512 } : {}) };
    if (this.request.writeOps) return this.runWriteSide(options, this.request.writeOps);
    await this.attempt('info', async () => void (await info(file)));
    if (follow) await this.attempt('infoChain', async () => void (await infoChain(file)));
    await this.attempt('check', async () => void (await check(file, { format: 'qcow2' })));
    let image: Image | undefined;
    await this.attempt('open', async () => {
      image = await open(file, options);
    });
    let data: Buffer | undefined;
    if (image) data = await this.readOpened(image);
    const size = image?.size;
    if (size === undefined || size <= this.request.guestLimit) await this.convertAndCompare(data);
  }

  async runWriteSide(options: Qcow2OpenOptions, ops: WriteOp[]): Promise<void> {
    const side = new WriteSide(this, this.request.image, options, ops);
    const { before, after, wrote } = await side.run();
    const { checkAgreed, checkDisagreement } = side;
    this.writeSide = { cleanBefore: isClean(before), cleanAfter: after && isClean(after), wrote, checkAgreed, checkDisagreement };
  }

  async failOnPurpose(how: NonNullable<FuzzRequest['selfTest']>): Promise<void> {
    await this.attempt(`self test: ${how}`, async () => {
      if (how === 'crash') process.kill(process.pid, 'SIGSEGV');
      if (how === 'hang') await new Promise(() => undefined);
      throw new Error('an error without a code');
    });
  }

  /** Read, map and iterate the open image; returns the bytes read when the read succeeded. */
  async readOpened(image: Image): Promise<Buffer | undefined> {
    const limit = Math.min(image.size, this.request.guestLimit);
    let data: Buffer | undefined;
    await this.attempt('read', async () => {
      data = await readAll(image, limit);
    });
    await this.attempt('read unaligned', async () => {
      if (limit < 2) return;
      const length = Math.min(limit - 1, 3 * 512 + 7);
      await image.read(Buffer.alloc(length), 1);
    });
    await this.attempt('parallel reads and extents', () => readInParallel(image, limit));
    await this.attempt('extents', async () => {
      const extents: Extent[] = [];
      for await (const extent of image.extents({ offset: 0, length: limit })) extents.push(extent);
      this.checkExtents(extents, limit, data);
    });
    await this.attempt('map', async () => {
      let next = 0;
      for await (const batch of mapImage(image, { maxLength: limit })) {
        for (const entry of batch) {
          if (entry.start !== next || entry.length <= 0) this.problems.push(`map: entry ${JSON.stringify(entry)} does not continue at ${next}`);
          next = entry.start + entry.length;
        }
      }
      if (next !== limit) this.problems.push(`map: entries end at ${next}, not at ${limit}`);
    });
    await this.attempt('close', () => image.close());
    return data;
  }

  /** Extents must tile [0, limit) in order; zero runs must read as zeros. */
  checkExtents(extents: Extent[], limit: number, data: Buffer | undefined): void {
    let next = 0;
    for (const e of extents) {
      if (e.offset !== next || !(e.length > 0)) {
        this.problems.push(`extents: ${JSON.stringify(e)} does not continue at ${next}`);
        return;
      }
      next = e.offset + e.length;
      if (data && e.kind === 'zero' && data.subarray(e.offset, next).some((b) => b !== 0)) {
        this.problems.push(`extents: zero run ${JSON.stringify(e)} does not read as zeros`);
      }
    }
    if (next !== limit) this.problems.push(`extents end at ${next}, not at the end of the range ${limit}`);
  }

  /** convert -O raw; when the read succeeded too, the output must hold exactly the bytes read, and compare must agree. */
  async convertAndCompare(data: Buffer | undefined): Promise<void> {
    const { image: file, follow, out } = this.request;
    const converted = await this.attempt('convert', () => convert(file, out, { outputFormat: 'raw', followFileNames: follow }));
    await this.convertToQcow2(converted);
    if (!converted || !data) return;
    const output = await readFile(out);
    if (!output.subarray(0, data.length).equals(data)) this.problems.push('convert: the raw output differs from the bytes read');
    await this.attempt('compare', async () => {
      const [a, b] = [await open(file, { readOnly: true, followFileNames: follow }), await open(out, { readOnly: true, format: 'raw' })];
      try {
        const result = await compareImages(a, b);
        if (!result.identical) this.problems.push(`compare: the image and its conversion differ (${JSON.stringify(result)})`);
      } finally {
        await Promise.all([a.close(), b.close()]);
      }
    });
  }

  /** convert -O qcow2: qemu-img check must find the output clean, and qemu must read it as the raw conversion. */
  async convertToQcow2(rawConverted: boolean): Promise<void> {
    const { image: file, follow, out } = this.request;
    const target = `${out}.qcow2`;
    const converted = await this.attempt('convert to qcow2', () => convert(file, target, { outputFormat: 'qcow2', followFileNames: follow }));
    if (!converted) return;
    await this.announce('qemu-img check of the qcow2 conversion');
    const verdict: QemuVerdict = await qemuCheck(target);
    if (!verdict.checked || verdict.corruptions + verdict.leaks + verdict.checkErrors > 0) {
      this.problems.push(`convert -O qcow2 wrote an image qemu-img check does not find clean: ${verdict.summary}`);
    }
    if (!rawConverted) {
      this.problems.push('convert -O qcow2 succeeded where convert -O raw failed');
      return;
    }
    await this.announce('qemu-img compare of the two conversions');
    const compared = await runQemu('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', target, out]);
    if (compared.code !== 0) {
      this.problems.push(`qemu-img compare finds the qcow2 and raw conversions different: exit ${compared.code}: ${(compared.stdout + compared.stderr).trim()}`);
    }
  }
}

/** The first `limit` guest bytes, read in aligned chunks of at most 1 MiB. */
async function readAll(image: Image, limit: number): Promise<Buffer> {
  const out = Buffer.alloc(limit);
  const buffer = allocAligned(Math.min(CHUNK, Math.max(limit, 4096)));
  for (let at = 0; at < limit; at += CHUNK) {
    const view = buffer.subarray(0, Math.min(CHUNK, limit - at));
    await image.read(view, at);
    view.copy(out, at);
  }
  return out;
}

/** Eight reads spread over the disk and an extents walk, all at once: failures of shared tables meet. */
async function readInParallel(image: Image, limit: number): Promise<void> {
  const length = Math.min(limit, 65536);
  const reads = Array.from({ length: 8 }, (_, i) => {
    const offset = Math.floor(((limit - length) * i) / 8 / 512) * 512;
    return image.read(Buffer.alloc(length), offset);
  });
  const walk = (async () => {
    for await (const _ of image.extents({ offset: 0, length: limit }));
  })();
  const failed = (await Promise.allSettled([...reads, walk])).find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}

let current: CaseRun | undefined;

/** A rejection nobody handles would take a user's process down: it is a problem of the case running. */
process.on('unhandledRejection', (reason) => {
  const problem = `unhandled rejection: ${describeThrown(reason)}`;
  if (current) current.problems.push(problem);
  else void send({ problem });
});

process.on('message', (request: FuzzRequest) => {
  const run = new CaseRun(request);
  current = run;
  void run
    .run()
    .catch((error: unknown) => run.problems.push(`the harness itself failed: ${describeThrown(error)}`))
    // One turn of the event loop lets late unhandled rejections land in this case.
    .then(() => new Promise((resolve) => setImmediate(resolve)))
    .then(() => {
      current = undefined;
      return send({ id: request.id, done: true, outcomes: run.outcomes, problems: run.problems, writeSide: run.writeSide });
    });
});
