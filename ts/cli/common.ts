/** Helpers the CLI commands share: opening images like qemu-img, option values, sizes, progress. */
import { Qcow2Error, asQcow2Error } from '../errors.js';
import type { Image, ImageFormat } from '../image.js';
import { CACHE_MODES, CacheMode } from '../native.js';
import { open } from '../open.js';
import { ParsedArgs, UsageError, lastOption, parseSize } from './args.js';

/** qemu-img's default host cache mode for images it reads or writes in place (page cache on). */
export const DEFAULT_CACHE: CacheMode = 'writeback';

/** How the CLI opens an image: format (-f), host cache (-t/-T), read-only unless a command writes. */
export interface CliOpenOptions {
  format?: ImageFormat;
  cache?: CacheMode;
  readOnly?: boolean;
}

/**
 * Open an image the way qemu-img does: backing and data file names the image records are
 * followed, and a failure reads "Could not open 'PATH': REASON".
 */
export async function openImage(path: string, options: CliOpenOptions = {}): Promise<Image> {
  try {
    return await open(path, {
      format: options.format,
      cache: options.cache ?? DEFAULT_CACHE,
      readOnly: options.readOnly ?? true,
      followFileNames: true,
    });
  } catch (error) {
    const cause = asQcow2Error(error);
    throw new Qcow2Error(cause.code, `Could not open '${path}': ${cause.message}`, { cause });
  }
}

/** The image format named by -f/-F/-O, or a usage error naming the unknown one. */
export function parseFormat(text: string | undefined): ImageFormat | undefined {
  if (text === undefined) return undefined;
  if (text !== 'raw' && text !== 'qcow2') throw new UsageError(`Unknown file format '${text}'`);
  return text;
}

/** The cache mode given by -t (`what` = "cache") or -T (`what` = "source cache"). */
export function parseCache(text: string | undefined, what: 'cache' | 'source cache'): CacheMode | undefined {
  if (text === undefined) return undefined;
  if (!(CACHE_MODES as readonly string[]).includes(text)) throw new UsageError(`Invalid ${what} option: ${text}`);
  return text as CacheMode;
}

/** A size option (with qemu-img's suffixes); a bad one gets qemu-img's message naming `what`. */
export function parseSizeOption(text: string, what: string): number {
  try {
    return parseSize(text);
  } catch {
    throw new UsageError(
      `Invalid ${what} specified. You may use k, M, G, T, P or E suffixes for\n` +
        'kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
  }
}

/** Exactly `count` operands, or qemu-img's "Expecting …" usage error. */
export function expectOperands(args: ParsedArgs, count: 1 | 2, message?: string): string[] {
  if (args.positional.length !== count) {
    throw new UsageError(message ?? (count === 1 ? 'Expecting one image file name' : 'Expecting two image file names'));
  }
  return args.positional;
}

/** True when the flag `key` was given at least once. */
export function hasFlag(args: ParsedArgs, key: string): boolean {
  return args.options.has(key);
}

/** The last value of `key`, parsed by `parse` when present. */
export function optionValue<T>(args: ParsedArgs, key: string, parse: (text: string) => T): T | undefined {
  const text = lastOption(args, key);
  return text === undefined ? undefined : parse(text);
}

/** Where progress lines go: anything with a write(string) method (process.stdout by default). */
export interface TextSink {
  write(text: string): unknown;
}

/**
 * qemu-img's -p display: "    (xx.xx/100%)\r" lines on stdout, printed at 0 and 100 and
 * whenever the value moved by more than `minStep` percent, and a newline at the end.
 */
export class ProgressPrinter {
  #last = 0;

  constructor(
    readonly enabled: boolean,
    private readonly minStep: number,
    private readonly out: TextSink = process.stdout,
  ) {}

  /** Show `done` of `total` (nothing to do shows as 0%, as in qemu-img). */
  update(done: number, total: number): void {
    this.set(total > 0 ? (100 * done) / total : 0);
  }

  /** Show `percent` (clamped to 100), if it moved enough since the last line. */
  set(percent: number): void {
    if (!this.enabled) return;
    // qemu keeps the value in a C float: round the same way so the printed digits agree.
    const value = Math.fround(Math.min(percent, 100));
    if (value > this.#last + this.minStep || value < this.#last - this.minStep || value === 0 || value === 100) {
      this.#last = value;
      this.out.write(`    (${value.toFixed(2)}/100%)\r`);
    }
  }

  /** The line qemu-img ends a progress display with. */
  end(): void {
    if (this.enabled) this.out.write('\n');
  }
}

/** Text written to stdout in large pieces, waiting for the pipe to drain when it is full. */
export class OutputBuffer {
  #parts: string[] = [];
  #length = 0;

  constructor(
    private readonly stream: NodeJS.WritableStream = process.stdout,
    private readonly chunkSize = 1 << 16,
  ) {}

  /** Queue `text`; resolves at once unless a full chunk had to wait for the stream. */
  async push(text: string): Promise<void> {
    this.#parts.push(text);
    this.#length += text.length;
    if (this.#length >= this.chunkSize) await this.flush();
  }

  /** Write everything queued. */
  async flush(): Promise<void> {
    if (this.#length === 0) return;
    const text = this.#parts.join('');
    this.#parts = [];
    this.#length = 0;
    if (!this.stream.write(text)) await new Promise<void>((resolve) => this.stream.once('drain', resolve));
  }
}
