/** `qcow2 dd [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output`. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import type { ImageFormat } from '../image.js';
import { DdOptions, MAX_BLOCK_SIZE, dd } from '../tools/dd.js';
import { ParsedArgs, UsageError, parseArgs, qemuUsage } from './args.js';
import { hasFlag } from './common.js';
import { NON_CREATABLE_FORMATS, OTHER_CREATABLE_FORMATS, openInput } from './measure.js';
import { cvtnum } from './qemu-number.js';

const SPEC = {
  short: 'hf:O:U',
  long: {
    help: { value: false, key: 'h' },
    object: { value: true },
    'image-opts': { value: false },
    'force-share': { value: false, key: 'U' },
  },
};

const USAGE = 'usage: qcow2 dd [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output\n';

/** The operands dd takes, as `name=value`. */
interface Operands {
  blockSize?: number;
  count?: bigint;
  skip?: bigint;
  input?: string;
  output?: string;
}

function warn(message: string): void {
  process.stderr.write(`qcow2: ${message}\n`);
}

/** Apply one operand, in qemu-img dd's wording for a bad one. */
function applyOperand(operands: Operands, text: string): void {
  const eq = text.indexOf('=');
  if (eq < 0) throw new UsageError(`unrecognized operand ${text}`);
  const name = text.slice(0, eq);
  const value = text.slice(eq + 1);
  switch (name) {
    case 'bs':
      operands.blockSize = Number(cvtnum('bs', value, 1n, BigInt(MAX_BLOCK_SIZE), warn));
      break;
    case 'count':
      operands.count = cvtnum('count', value, undefined, undefined, warn);
      break;
    case 'skip':
      operands.skip = cvtnum('skip', value, undefined, undefined, warn);
      break;
    case 'if':
      operands.input = value;
      break;
    case 'of':
      operands.output = value;
      break;
    default:
      throw new UsageError(`unrecognized operand ${name}`);
  }
}

/** The output format named by -O: raw or qcow2; other formats qemu-img knows are refused by name. */
function outputFormatOf(name: string): ImageFormat {
  if (name === 'raw' || name === 'qcow2') return name;
  if (OTHER_CREATABLE_FORMATS.includes(name)) {
    throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `Format '${name}' is not supported as dd output (raw, qcow2)`);
  }
  if (NON_CREATABLE_FORMATS.includes(name)) {
    throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `Format driver '${name}' does not support image creation`);
  }
  throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, 'Unknown file format');
}

function parse(argv: string[]): ParsedArgs {
  try {
    return parseArgs(argv, SPEC);
  } catch (error) {
    if (error instanceof UsageError) throw qemuUsage(error, argv);
    throw error;
  }
}

/** Run `qcow2 dd` with `argv`; resolves to the exit code. */
export async function run(argv: string[]): Promise<number> {
  const args = parse(argv);
  if (hasFlag(args, 'h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (hasFlag(args, 'object')) throw new UsageError('--object is not supported by qcow2 dd');
  if (hasFlag(args, 'image-opts')) throw new UsageError('--image-opts is not supported by qcow2 dd');
  const operands: Operands = {};
  for (const text of args.positional) applyOperand(operands, text);
  if (operands.input === undefined || operands.output === undefined) throw new UsageError('Must specify both input and output files');
  const source = await openInput(operands.input, args.options.get('f')?.at(-1));
  try {
    const options: DdOptions = {
      blockSize: operands.blockSize,
      count: operands.count,
      skip: operands.skip,
      outputFormat: outputFormatOf(args.options.get('O')?.at(-1) ?? 'raw'),
      onWarning: warn,
    };
    await dd(source, operands.output, options);
  } finally {
    await source.close();
  }
  return 0;
}
