/** `qcow2 bench`: a drop-in for `qemu-img bench`, the same workload and the same output. */
import { Qcow2Error } from '../errors.js';
import { CACHE_MODES, CacheMode } from '../native.js';
import { bench, benchDefaults } from '../tools/bench.js';
import { errorText, parseNumber } from '../tools/io/format.js';
import { ProbedRawImage, rawProbeWarning } from '../tools/io/probe-guard.js';
import { UsageError, lastOption, parseArgs } from './args.js';
import { DEFAULT_CACHE, expectOperands, openImage, optionValue, parseSizeOption } from './common.js';

const SPEC = {
  short: 'c:d:f:hi:no:qs:S:t:wU',
  long: {
    'flush-interval': { value: true },
    'no-drain': { value: false },
    pattern: { value: true },
    'force-share': { value: false, key: 'U' },
    help: { value: false, key: 'h' },
    'image-opts': { value: false },
    object: { value: true },
  },
};

const USAGE =
  'usage: qcow2 bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain]\n' +
  '                   [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename\n';

const INT_MAX = 2147483647;

/** A decimal (or 0x hex, 0 octal) integer in [min, max], or a usage error with `message`. */
function integerOption(text: string, min: number, max: number, message: string): number {
  const ok = /^\s*(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)$/.test(text);
  const body = text.trim();
  const value = !ok ? NaN : /^0[xX]/.test(body) ? parseInt(body, 16) : body.startsWith('0') ? parseInt(body, 8) : Number(body);
  if (!(value >= min && value <= max)) throw new UsageError(message);
  return value;
}

/** A size in qemu's syntax (hex and unit suffixes too); otherwise the shared parser reads it or gives qemu-img's message. */
function sizeOption(text: string, what: string): number {
  try {
    const value = parseNumber(text);
    if (Number.isSafeInteger(value)) return value;
  } catch {
    // Not qemu's number syntax: the shared parser decides.
  }
  return parseSizeOption(text, what);
}

/** A size option no larger than INT_MAX, with qemu-img's messages. */
function intSizeOption(text: string, what: string): number {
  const value = sizeOption(text, what);
  if (value > INT_MAX) throw new UsageError(`Invalid ${what} specified. Must be between 0 and ${INT_MAX}.`);
  return value;
}

/** Run `qcow2 bench` with `argv` (the arguments after the subcommand); resolves to the exit code. */
export async function run(argv: string[]): Promise<number> {
  const args = parseArgs(argv, SPEC);
  if (args.options.has('h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  const count = optionValue(args, 'c', (t) => integerOption(t, 0, INT_MAX, 'Invalid request count specified'));
  const depth = optionValue(args, 'd', (t) => integerOption(t, 1, INT_MAX, 'Invalid queue depth specified'));
  const size = optionValue(args, 's', (t) => intSizeOption(t, 'buffer size'));
  const step = optionValue(args, 'S', (t) => intSizeOption(t, 'step_size'));
  const offset = optionValue(args, 'o', (t) => sizeOption(t, 'offset'));
  const pattern = optionValue(args, 'pattern', (t) => integerOption(t, 0, 255, 'Invalid pattern byte specified'));
  const flushInterval = optionValue(args, 'flush-interval', (t) => integerOption(t, 0, INT_MAX, 'Invalid flush interval specified'));
  const cacheText = lastOption(args, 't');
  if (cacheText !== undefined && !(CACHE_MODES as readonly string[]).includes(cacheText)) throw new UsageError('Invalid cache mode');
  const cache = (cacheText as CacheMode | undefined) ?? DEFAULT_CACHE;
  const aio = lastOption(args, 'i');
  if (aio !== undefined && !['threads', 'native', 'io_uring'].includes(aio)) throw new UsageError(`Invalid aio option: ${aio}`);
  const write = args.options.has('w');
  const drain = !args.options.has('no-drain');
  const [file] = expectOperands(args, 1);
  const options = benchDefaults({ count, depth, size, step, offset, write, pattern, flushInterval, drain });
  if (flushInterval !== undefined && flushInterval > 0 && !write) {
    throw new UsageError('--flush-interval is only available in write tests');
  }
  if (options.flushInterval > 0 && options.flushInterval < options.depth) {
    throw new UsageError("Flush interval can't be smaller than depth");
  }
  const formatText = lastOption(args, 'f');
  if (formatText !== undefined && formatText !== 'raw' && formatText !== 'qcow2') {
    throw new Qcow2Error('ERR_QCOW2_INVALID_ARGUMENT', `Could not open '${file}': Unknown driver '${formatText}'`);
  }
  const opened = await openImage(file, { format: formatText as 'raw' | 'qcow2' | undefined, cache, readOnly: !write });
  // Like qemu-img, a writable image whose format was guessed as raw is warned about and guarded.
  const probedRaw = write && formatText === undefined && opened.format === 'raw';
  if (probedRaw) process.stderr.write(rawProbeWarning(file));
  const image = probedRaw ? new ProbedRawImage(opened) : opened;
  try {
    process.stdout.write(
      `Sending ${options.count} ${write ? 'write' : 'read'} requests, ${options.size} bytes each, ${options.depth} in parallel ` +
        `(starting at offset ${options.offset}, step size ${options.step})\n`,
    );
    if (options.flushInterval > 0) process.stdout.write(`Sending flush every ${options.flushInterval} requests\n`);
    let seconds: number;
    try {
      ({ seconds } = await bench(image, options));
    } catch (error) {
      process.stderr.write(`qcow2: Failed request: ${errorText(error)}\n`);
      return 1;
    }
    process.stdout.write(`Run completed in ${seconds.toFixed(3)} seconds.\n`);
    return 0;
  } finally {
    await image.close();
  }
}
