/** `qcow2 create [-q] [-f FMT] [-b BACKING [-F BACKING_FMT]] [-u] [-o OPTIONS] FILENAME [SIZE]`, as qemu-img create. */
import { ErrorCodes, Qcow2Error, asQcow2Error } from '../errors.js';
import type { ImageFormat } from '../image.js';
import { CreateOptions, create, createSize } from '../tools/create.js';
import {
  OptionValues,
  createOptionsFrom,
  formattingLine,
  isHelpRequest,
  optionHelp,
  parseCreateOptions,
  parseOptionSize,
} from '../tools/qemu-options.js';
import { UsageError, lastOption, parseArgs } from './args.js';
import { hasFlag } from './common.js';

const SPEC = {
  short: 'F:b:f:ho:qu',
  long: { help: { value: false, key: 'h' } },
};

/** qemu-img's hint after a malformed command line. */
const HELP_HINT = "\nTry 'qcow2 --help' for more information";

const USAGE = 'usage: qcow2 create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]\n';

/** The largest size qemu-img takes on its command line (INT64_MAX). */
const MAX_QEMU_SIZE = 2n ** 63n - 1n;

/** The SIZE operand: qemu's size syntax, from 0 to INT64_MAX (and, here, 2^53 - 1). */
function parseSizeOperand(text: string): number {
  if (/^\d+$/.test(text.trim()) && BigInt(text.trim()) > MAX_QEMU_SIZE) {
    throw new UsageError(`Invalid image size specified. Must be between 0 and ${MAX_QEMU_SIZE}.`);
  }
  try {
    return parseOptionSize('size', text);
  } catch (error) {
    if (/above 2\^53/.test((error as Error).message)) throw error;
    // qemu-img reports this in two lines, each with its program name.
    throw new UsageError(
      'Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n' +
        'qcow2: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
  }
}

/** The format named by -f: an unknown one is an error about the image, as in qemu-img. */
function parseCreateFormat(text: string | undefined, file: string): ImageFormat {
  if (text === undefined) return 'raw';
  if (text !== 'raw' && text !== 'qcow2') {
    throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `${file}: Unknown file format '${text}'`);
  }
  return text;
}

/** Errors about the image read "FILE: MESSAGE", as qemu-img prints them. */
function aboutFile(file: string, error: unknown): Qcow2Error {
  const cause = asQcow2Error(error);
  return new Qcow2Error(cause.code, `${file}: ${cause.message}`, { cause });
}

/** Run `qcow2 create` with `argv`; resolves to the exit code. */
export async function run(argv: string[]): Promise<number> {
  const args = parseArgs(argv, SPEC);
  if (hasFlag(args, 'h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  const optionTexts = args.options.get('o') ?? [];
  const [file, sizeText, ...extra] = args.positional;
  const format = parseCreateFormat(lastOption(args, 'f'), file ?? '');
  if (optionTexts.some(isHelpRequest)) {
    process.stdout.write(optionHelp(format, file !== undefined));
    return 0;
  }
  if (file === undefined) throw new UsageError(`Expecting image file name${HELP_HINT}`);
  if (extra.length > 0) throw new UsageError(`Unexpected argument: ${extra[0]}${HELP_HINT}`);
  const size = sizeText === undefined ? undefined : parseSizeOperand(sizeText);
  let values: OptionValues;
  try {
    values = parseCreateOptions(format, optionTexts);
  } catch (error) {
    throw aboutFile(file, error);
  }
  // -b and -F are set after -o, so they win over backing_file/backing_fmt given there.
  const backing = lastOption(args, 'b');
  const backingFormat = lastOption(args, 'F');
  if (backing !== undefined) values.set('backing_file', backing);
  if (backingFormat !== undefined) values.set('backing_fmt', backingFormat);
  if (size !== undefined && values.has('size')) throw aboutFile(file, new UsageError('The image size must be specified only once'));
  const options: CreateOptions = { ...createOptionsFrom(format, values), skipBackingCheck: hasFlag(args, 'u') };
  if (size !== undefined) options.size = size;
  try {
    if (format === 'raw' && values.has('backing_fmt') && !values.has('backing_file')) {
      throw new UsageError(`Backing file not supported for file format 'raw'`);
    }
    const finalSize = await createSize(file, options);
    if (!hasFlag(args, 'q')) process.stdout.write(formattingLine(file, format, new Map(values).set('size', String(finalSize))) + '\n');
    await create(file, { ...options, size: finalSize, skipBackingCheck: true });
  } catch (error) {
    throw aboutFile(file, error);
  }
  return 0;
}
