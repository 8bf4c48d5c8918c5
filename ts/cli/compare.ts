/** `qcow2 compare [-f FMT] [-F FMT] [-T CACHE] [-p] [-q] [-s] [-U] A B`: qemu-img compare's verdicts and exit codes. */
import type { Image } from '../image.js';
import { CompareError, CompareResult, compareImages } from '../tools/compare.js';
import { lastOption, parseArgs } from './args.js';
import { ProgressPrinter, expectOperands, hasFlag, openImage, parseCache, parseFormat } from './common.js';
import { printError } from './main.js';

const SPEC = {
  short: 'f:F:T:pqshU',
  long: {
    'force-share': { value: false, key: 'U' },
    help: { value: false, key: 'h' },
  },
};

const USAGE = 'usage: qcow2 compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2\n';

/** qemu-img compare's exit codes. */
const EXIT = { identical: 0, different: 1, openFailed: 2, statusFailed: 3, readFailed: 4 } as const;

/** Run `qcow2 compare` with `argv`; resolves to qemu-img compare's exit code (0 to 4). */
export async function run(argv: string[]): Promise<number> {
  const args = parseArgs(argv, SPEC);
  if (hasFlag(args, 'h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  const formatA = parseFormat(lastOption(args, 'f'));
  const formatB = parseFormat(lastOption(args, 'F'));
  const cache = parseCache(lastOption(args, 'T'), 'source cache');
  const quiet = hasFlag(args, 'q');
  const strict = hasFlag(args, 's');
  const [fileA, fileB] = expectOperands(args, 2);
  const say = (text: string) => {
    if (!quiet) process.stdout.write(text);
  };
  const progress = new ProgressPrinter(hasFlag(args, 'p') && !quiet, 2);
  const images: Image[] = [];
  try {
    try {
      images.push(await openImage(fileA, { format: formatA, cache }));
      images.push(await openImage(fileB, { format: formatB, cache }));
    } catch (error) {
      printError(error);
      return EXIT.openFailed;
    }
    // Images of different sizes get a warning once their common part matched, before the
    // longer one's tail is checked: between progress lines, as qemu-img prints it.
    const common = Math.min(images[0].size, images[1].size);
    let warn = !strict && images[0].size !== images[1].size;
    const warnOnce = () => {
      if (warn) say('Warning: Image size mismatch!\n');
      warn = false;
    };
    const result = await compareImages(images[0], images[1], {
      strict,
      onProgress: (done, total) => {
        progress.update(done, total);
        if (done >= common) warnOnce();
      },
    });
    if (result.identical || (result.verdict === 'content' && result.offset! >= common)) warnOnce();
    say(verdictText(result));
    return result.identical ? EXIT.identical : EXIT.different;
  } catch (error) {
    printError(error);
    if (error instanceof CompareError) return error.phase === 'status' ? EXIT.statusFailed : EXIT.readFailed;
    return EXIT.openFailed;
  } finally {
    progress.end();
    for (const image of images) await image.close();
  }
}

/** What qemu-img compare prints for `result`. */
function verdictText(result: CompareResult): string {
  switch (result.verdict) {
    case 'size':
      return 'Strict mode: Image size mismatch!\n';
    case 'status':
      return `Strict mode: Offset ${result.offset} block status mismatch!\n`;
    case 'content':
      return `Content mismatch at offset ${result.offset}!\n`;
    case 'identical':
      return 'Images are identical.\n';
  }
}
