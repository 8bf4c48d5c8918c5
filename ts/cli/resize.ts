/** `qcow2 resize [-q] [-f FMT] [--shrink] [--preallocation=MODE] FILENAME [+|-]SIZE`, as qemu-img resize. */
import { Qcow2Error, asQcow2Error } from '../errors.js';
import { Preallocation } from '../tools/create.js';
import { parseOptionSize } from '../tools/qemu-options.js';
import type { Image } from '../image.js';
import { SizeChange, openForResize, resizeImage } from '../tools/resize.js';
import { UsageError, lastOption, parseArgs } from './args.js';
import { hasFlag, parseFormat } from './common.js';

const SPEC = {
  short: 'f:hq',
  long: {
    help: { value: false, key: 'h' },
    shrink: { value: false },
    preallocation: { value: true },
  },
};

/** qemu-img's hint after a malformed command line. */
const HELP_HINT = "\nTry 'qcow2 --help' for more information";

const USAGE = 'usage: qcow2 resize [-q] [-f fmt] [--preallocation=prealloc] [--shrink] filename [+ | -]size\n';

const SHRINK_WARNING =
  "warning: Shrinking an image will delete all data beyond the shrunken image's end. " +
  'Before performing such an operation, make sure there is no important data there.';

/** "[+|-]SIZE": an absolute size, or a change of the current one. */
function parseSizeArgument(text: string): number | SizeChange {
  const sign = text[0] === '+' ? 1 : text[0] === '-' ? -1 : 0;
  const bytes = parseOptionSize('size', sign === 0 ? text : text.slice(1));
  return sign === 0 ? bytes : { delta: sign * bytes };
}

function parsePreallocation(text: string | undefined): Preallocation | undefined {
  if (text === undefined) return undefined;
  if (!['off', 'metadata', 'falloc', 'full'].includes(text)) throw new UsageError(`Invalid preallocation mode '${text}'`);
  return text as Preallocation;
}

/** Run `qcow2 resize` with `argv`; resolves to the exit code. */
export async function run(argv: string[]): Promise<number> {
  if (argv.includes('-h') || argv.includes('--help')) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (argv.length < 2) throw new UsageError(`Not enough arguments${HELP_HINT}`);
  // The size is taken off the end first, as qemu-img does, so that "-1G" is not read as an option.
  const sizeText = argv[argv.length - 1];
  const args = parseArgs(argv.slice(0, -1), SPEC);
  if (args.positional.length !== 1) throw new UsageError(`Expecting image file name and size${HELP_HINT}`);
  const format = parseFormat(lastOption(args, 'f'));
  const preallocation = parsePreallocation(lastOption(args, 'preallocation'));
  const size = parseSizeArgument(sizeText);
  const shrink = hasFlag(args, 'shrink');
  const file = args.positional[0];
  let image: Image;
  try {
    image = await openForResize(file, { format, followFileNames: true });
  } catch (error) {
    // For system errors qemu-img names the file once more in front of the driver's own "Could not open".
    const cause = asQcow2Error(error);
    if (!/^E[A-Z0-9]+$/.test(cause.code)) throw cause;
    throw new Qcow2Error(cause.code, `Could not open '${file}': ${cause.message}`, { cause });
  }
  try {
    await resizeImage(image, size, { shrink, preallocation });
  } catch (error) {
    const cause = asQcow2Error(error);
    if (cause.message.startsWith('Use the --shrink option')) {
      throw new Qcow2Error(cause.code, `${cause.message}\nqcow2: ${SHRINK_WARNING}`, { cause });
    }
    throw cause;
  } finally {
    await image.close();
  }
  if (!hasFlag(args, 'q')) process.stdout.write('Image resized.\n');
  return 0;
}
