/** `qcow2 commit [-q] [-f fmt] [-t cache] [-b base] [-d] [-p] [-r rate_limit] filename`, as qemu-img commit. */
import { commit } from '../tools/commit.js';
import { HELP_HINT, UsageError, lastOption } from './args.js';
import { imageFormatOption, parseChainCommand, warnIfProbedRaw } from './chain-options.js';
import { DEFAULT_CACHE, ProgressPrinter, hasFlag, parseCache, parseSizeOption } from './common.js';

const SPEC = {
  short: 'f:ht:b:dpqr:',
  long: {
    help: { value: false, key: 'h' },
    object: { value: true },
    'image-opts': { value: false },
  },
};

const USAGE = 'usage: qcow2 commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename\n';

/** qemu-img's -r value; its two-line complaint has the program name on both lines. */
function parseRateLimit(text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  try {
    return parseSizeOption(text, 'rate limit');
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    throw new UsageError(error.message.replace('\n', '\nqcow2: '));
  }
}

/** Run `qcow2 commit` with `argv`; resolves to the exit code. */
export async function run(argv: string[]): Promise<number> {
  const args = parseChainCommand(argv, SPEC, USAGE);
  if (!args) return 0;
  const rateLimit = parseRateLimit(lastOption(args, 'r'));
  const quiet = hasFlag(args, 'q');
  if (args.positional.length !== 1) throw new UsageError(`Expecting one image file name${HELP_HINT}`);
  const file = args.positional[0];
  const cache = parseCache(lastOption(args, 't'), 'cache') ?? DEFAULT_CACHE;
  const format = imageFormatOption(lastOption(args, 'f'), file);
  const progress = new ProgressPrinter(hasFlag(args, 'p') && !quiet, 1);
  let started = false;
  try {
    await warnIfProbedRaw(file, format);
    await commit(file, {
      format,
      base: lastOption(args, 'b'),
      keepOverlay: hasFlag(args, 'd'),
      cache,
      rateLimit,
      followFileNames: true,
      onOpened: () => {
        started = true;
        progress.set(0);
      },
      onProgress: (done, total) => progress.update(done, total),
    });
    progress.set(100);
  } finally {
    if (started) progress.end();
  }
  if (!quiet) process.stdout.write('Image committed.\n');
  return 0;
}
