/** `qcow2 rebase [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename`, as qemu-img rebase. */
import type { ImageFormat } from '../image.js';
import { rebase } from '../tools/rebase.js';
import { HELP_HINT, UsageError, lastOption } from './args.js';
import { DEFAULT_CACHE, ProgressPrinter, hasFlag, parseCache } from './common.js';
import { imageFormatOption, parseChainCommand, warnIfProbedRaw } from './chain-options.js';

const SPEC = {
  short: 'hf:F:b:upt:T:qU',
  long: {
    help: { value: false, key: 'h' },
    object: { value: true },
    'image-opts': { value: false },
    'force-share': { value: false, key: 'U' },
  },
};

const USAGE =
  'usage: qcow2 rebase [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename\n';

/** qemu-img shows the rebase's progress in steps of more than 2%. */
const PROGRESS_STEP = 2;

/** Run `qcow2 rebase` with `argv`; resolves to the exit code. */
export async function run(argv: string[]): Promise<number> {
  const args = parseChainCommand(argv, SPEC, USAGE);
  if (!args) return 0;
  const quiet = hasFlag(args, 'q');
  const unsafe = hasFlag(args, 'u');
  const backingFile = lastOption(args, 'b');
  if (args.positional.length !== 1) throw new UsageError(`Expecting one image file name${HELP_HINT}`);
  if (!unsafe && backingFile === undefined) throw new UsageError(`Must specify backing file (-b) or use unsafe mode (-u)${HELP_HINT}`);
  const file = args.positional[0];
  const progress = new ProgressPrinter(hasFlag(args, 'p') && !quiet, PROGRESS_STEP);
  progress.set(0);
  let percent = 0;
  try {
    const cache = parseCache(lastOption(args, 't'), 'cache') ?? DEFAULT_CACHE;
    const sourceCache = parseCache(lastOption(args, 'T'), 'source cache') ?? DEFAULT_CACHE;
    const format = imageFormatOption(lastOption(args, 'f'), file);
    await warnIfProbedRaw(file, format);
    await rebase(file, {
      backingFile: backingFile ?? '',
      backingFormat: lastOption(args, 'F') as ImageFormat | undefined,
      unsafe,
      format,
      cache,
      sourceCache,
      followFileNames: true,
      onProgress: (_done, total) => {
        // qemu adds a float step per unit of work: the same sums print the same digits.
        percent = Math.fround(percent + Math.fround(100 / total));
        progress.set(percent);
      },
    });
    progress.set(100);
  } finally {
    progress.end();
  }
  return 0;
}
