/** `qcow2 convert [-f FMT] -O raw [-t CACHE] [-T CACHE] [-m N] [-W] [-p] [-S SIZE] [--target-is-zero] [-n] [-U] SRC DST`. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import type { Image } from '../image.js';
import { convert } from '../tools/convert.js';
import { UsageError, lastOption, parseArgs, parseSize } from './args.js';
import { ProgressPrinter, hasFlag, openImage, optionValue, parseCache, parseFormat } from './common.js';

const SPEC = {
  short: 'f:O:t:T:m:WpqS:nUh',
  long: {
    'target-is-zero': { value: false },
    'force-share': { value: false, key: 'U' },
    help: { value: false, key: 'h' },
  },
};

const USAGE =
  'usage: qcow2 convert [-U] [-p] [-q] [-n] [--target-is-zero] [-f fmt] [-t cache] [-T src_cache] ' +
  '[-O output_fmt] [-S sparse_size] [-m num_coroutines] [-W] filename [filename2 [...]] output_filename\n';

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
  if (args.positional.length < 2) throw new UsageError('Must specify image file name');
  const sources = args.positional.slice(0, -1);
  const target = args.positional[args.positional.length - 1];
  if (outputFormat !== 'raw') {
    throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `ERR_QCOW2_UNSUPPORTED: output format '${outputFormat}' is not supported yet`);
  }
  const progress = new ProgressPrinter(hasFlag(args, 'p') && !hasFlag(args, 'q'), 1);
  progress.set(0);
  const images: Image[] = [];
  try {
    for (const source of sources) images.push(await openImage(source, { format, cache: sourceCache ?? 'writeback' }));
    await convert(images, target, {
      outputFormat,
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
