/** `qcow2 convert [-f FMT] -O raw|qcow2 [-o OPTIONS] [-c] [-B BACKING -F FMT] [-t CACHE] [-T CACHE] [-m N] [-W] [-p] [-S SIZE] [--target-is-zero] [-n] [-U] SRC DST`. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import type { Image, ImageFormat } from '../image.js';
import { convert } from '../tools/convert.js';
import type { Qcow2TargetOptions } from '../tools/convert-qcow2.js';
import { createOptionsFrom, isHelpRequest, optionHelp, parseCreateOptions } from '../tools/qemu-options.js';
import { ParsedArgs, UsageError, lastOption, parseArgs, parseSize } from './args.js';
import { ProgressPrinter, hasFlag, openImage, optionValue, parseCache, parseFormat } from './common.js';

const SPEC = {
  short: 'f:O:t:T:m:WpqS:nUhco:B:F:',
  long: {
    'target-is-zero': { value: false },
    'force-share': { value: false, key: 'U' },
    help: { value: false, key: 'h' },
  },
};

const USAGE =
  'usage: qcow2 convert [-U] [-c] [-p] [-q] [-n] [--target-is-zero] [-f fmt] [-t cache] [-T src_cache] ' +
  '[-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-S sparse_size] [-m num_coroutines] [-W] ' +
  'filename [filename2 [...]] output_filename\n';

/** qemu-img convert accepts 1 to 16 coroutines. */
const MAX_COROUTINES = 16;

function parseCoroutines(text: string): number {
  const n = /^\d+$/.test(text) ? Number(text) : NaN;
  if (!(n >= 1 && n <= MAX_COROUTINES)) {
    throw new UsageError(`Invalid number of coroutines. Allowed number of coroutines is between 1 and ${MAX_COROUTINES}`);
  }
  return n;
}

function parseSparseSize(text: string): number {
  let size: number;
  try {
    size = parseSize(text);
  } catch {
    throw new UsageError(
      'Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E suffixes for\n' +
        'kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
  }
  if (size % 512 !== 0 || size > 16 << 20) {
    throw new UsageError(
      'Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. ' +
        'Select 0 to disable sparse detection (fully allocates output).',
    );
  }
  return size;
}

/**
 * How a qcow2 target is made, from -o, -B, -F and -c, with qemu-img's refusals; undefined
 * for a raw target, which takes none of them.
 */
function qcow2Target(args: ParsedArgs, format: ImageFormat, optionTexts: string[], skipCreate: boolean): Qcow2TargetOptions | undefined {
  const backing = lastOption(args, 'B');
  const backingFormat = lastOption(args, 'F');
  if (optionTexts.length > 0 && skipCreate) throw new UsageError('-o has no effect when skipping image creation');
  if (backing !== undefined && backingFormat === undefined) throw new UsageError('Use of backing file requires explicit backing format');
  const values = parseCreateOptions(format, optionTexts);
  if (backing !== undefined) values.set('backing_file', backing);
  if (backingFormat !== undefined) values.set('backing_fmt', backingFormat);
  values.delete('size');
  if (format === 'raw') {
    if (hasFlag(args, 'c')) throw new Qcow2Error(ErrorCodes.UNSUPPORTED, 'Compression not supported for this file format');
    if (backing !== undefined) throw new Qcow2Error(ErrorCodes.UNSUPPORTED, "Backing file not supported for file format 'raw'");
    if (values.size > 0) throw new Qcow2Error(ErrorCodes.UNSUPPORTED, 'convert: -o options are only supported for qcow2 targets');
    return undefined;
  }
  const { format: _format, size: _size, ...create } = createOptionsFrom(format, values);
  const given = Object.fromEntries(Object.entries(create).filter(([, value]) => value !== undefined));
  return { ...(skipCreate ? {} : { create: given }), compress: hasFlag(args, 'c') };
}

/** Run `qcow2 convert` with `argv`; resolves to the exit code (errors are thrown to main, which exits 1). */
export async function run(argv: string[]): Promise<number> {
  const args = parseArgs(argv, SPEC);
  if (hasFlag(args, 'h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  const format = parseFormat(lastOption(args, 'f'));
  const outputFormat = parseFormat(lastOption(args, 'O') ?? 'raw');
  const targetCache = parseCache(lastOption(args, 't'), 'cache');
  const sourceCache = parseCache(lastOption(args, 'T'), 'source cache');
  const parallel = optionValue(args, 'm', parseCoroutines);
  const sparseSize = optionValue(args, 'S', parseSparseSize);
  const skipCreate = hasFlag(args, 'n');
  const targetIsZero = hasFlag(args, 'target-is-zero');
  if (targetIsZero && !skipCreate) throw new UsageError('--target-is-zero requires use of -n flag');
  const optionTexts = args.options.get('o') ?? [];
  if (optionTexts.some(isHelpRequest)) {
    process.stdout.write(optionHelp(outputFormat ?? 'raw', false));
    return 0;
  }
  if (args.positional.length < 2) throw new UsageError('Must specify image file name');
  const sources = args.positional.slice(0, -1);
  const target = args.positional[args.positional.length - 1];
  const qcow2 = qcow2Target(args, outputFormat ?? 'raw', optionTexts, skipCreate);
  const progress = new ProgressPrinter(hasFlag(args, 'p') && !hasFlag(args, 'q'), 1);
  progress.set(0);
  const images: Image[] = [];
  try {
    for (const source of sources) images.push(await openImage(source, { format, cache: sourceCache ?? 'writeback' }));
    await convert(images, target, {
      outputFormat,
      qcow2,
      targetCache,
      parallel,
      outOfOrder: hasFlag(args, 'W'),
      sparseSize,
      skipCreate,
      targetIsZero,
      // The 0% line is already out; a source without data only shows 0% and 100%.
      onProgress: progress.enabled
        ? (done, total) => {
            if (done > 0) progress.update(done, total);
          }
        : undefined,
    });
    progress.set(100);
  } finally {
    progress.end();
    for (const image of images) await image.close();
  }
  return 0;
}
