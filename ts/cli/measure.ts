/** `qcow2 measure [--output=human|json] [-O output_fmt] [-o options] [--size N | [-f fmt] [-l snapshot_param] [-U] filename]`. */
import { ErrorCodes, Qcow2Error, asQcow2Error } from '../errors.js';
import type { Image, ImageFormat } from '../image.js';
import { openMetadataFile } from '../qcow2/metadata-file.js';
import { MeasureOptions, MeasureResult, SnapshotSelector, measure, openAtSnapshot } from '../tools/measure.js';
import {
  OptionDef,
  OptionValues,
  createOptionsOf,
  parseOptionBool,
  parseOptionNumber,
  parseOptionSize,
  splitOptionString,
} from '../tools/qemu-options.js';
import { ParsedArgs, UsageError, parseArgs } from './args.js';
import { hasFlag, openImage } from './common.js';
import { cvtnum } from './qemu-number.js';

const SPEC = {
  short: 'hf:O:o:l:U',
  long: {
    help: { value: false, key: 'h' },
    'image-opts': { value: false },
    object: { value: true },
    output: { value: true },
    size: { value: true },
    'force-share': { value: false, key: 'U' },
  },
};

const USAGE =
  'usage: qcow2 measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [-f fmt] [-l snapshot_param] [-U] filename]\n';

/** Options of the file protocol, which qemu-img measure accepts beside the format's own. */
const PROTOCOL_OPTIONS: readonly OptionDef[] = [
  { name: 'nocow', type: 'bool', help: 'Turn off copy-on-write (valid only on btrfs)' },
  { name: 'extent_size_hint', type: 'size', help: 'Extent size hint for the image file, 0 to disable' },
];

/** qcow2's encryption options: accepted by the parser; only a LUKS format changes (and here refuses) the measure. */
const ENCRYPTION_OPTIONS: readonly OptionDef[] = [
  { name: 'encryption', type: 'bool', help: 'Encrypt the image with format aes (deprecated)' },
  ...['format', 'key-secret', 'cipher-alg', 'cipher-mode', 'ivgen-alg', 'ivgen-hash-alg', 'hash-alg'].map(
    (name): OptionDef => ({ name: `encrypt.${name}`, type: 'str', help: 'Encryption parameter' }),
  ),
  { name: 'encrypt.iter-time', type: 'num', help: 'Encryption parameter' },
];

/** Formats qemu-img 7.2 creates besides raw and qcow2 (this package does not; nor does it measure them). */
export const OTHER_CREATABLE_FORMATS = ['file', 'luks', 'parallels', 'qcow', 'qed', 'vdi', 'vhdx', 'vmdk', 'vpc'];
/** Formats qemu-img 7.2 knows that cannot create images. */
export const NON_CREATABLE_FORMATS = [
  'blkdebug', 'blklogwrites', 'blkverify', 'bochs', 'cloop', 'compress', 'copy-before-write', 'copy-on-read', 'dmg',
  'ftp', 'ftps', 'gluster', 'host_cdrom', 'host_device', 'http', 'https', 'iscsi', 'iser', 'nbd', 'nfs', 'null-aio',
  'null-co', 'nvme', 'preallocate', 'quorum', 'rbd', 'replication', 'snapshot-access', 'ssh', 'throttle', 'vvfat',
];

/** An error message whose later lines each carry the CLI's prefix, as qemu-img's consecutive error lines do. */
function lines(...parts: string[]): string {
  return parts.join('\nqcow2: ');
}

function fail(message: string): Qcow2Error {
  return new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, message);
}

function parseOutput(text: string): 'human' | 'json' {
  if (text !== 'human' && text !== 'json') throw new UsageError('--output must be used with human or json as argument.');
  return text;
}

/** qemu-img's check of one -o argument: not empty, not starting with a comma, no lone comma at the end. */
function checkOptionList(text: string): void {
  const trailing = text.length - text.replace(/,+$/, '').length;
  if (text === '' || text.startsWith(',') || trailing % 2 === 1) throw new UsageError(`Invalid option list: ${text}`);
}

/** -l: "snapshot.id=ID,snapshot.name=NAME" (either or both), or an id or name. */
function parseSnapshotParam(text: string): SnapshotSelector | string {
  if (!text.startsWith('snapshot.')) return text;
  const selector: SnapshotSelector = {};
  for (const item of splitOptionString(text)) {
    const eq = item.indexOf('=');
    const key = eq < 0 ? item : item.slice(0, eq);
    const value = eq < 0 ? 'on' : item.slice(eq + 1);
    if (key === 'snapshot.id') selector.id = value;
    else if (key === 'snapshot.name') selector.name = value;
    else throw new UsageError(lines(`Invalid parameter '${key}'`, `Failed in parsing snapshot param '${text}'`));
  }
  return selector;
}

/** The output format named by -O, refused with qemu-img's message when it is not raw or qcow2. */
function outputFormatOf(name: string): ImageFormat {
  if (name === 'raw' || name === 'qcow2') return name;
  if (OTHER_CREATABLE_FORMATS.includes(name)) throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `Block driver '${name}' does not support size measurement`);
  if (NON_CREATABLE_FORMATS.includes(name)) throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `Format driver '${name}' does not support image creation`);
  throw fail(`Unknown file format '${name}'`);
}

/** Parse the accumulated -o text for `format` as qemu's option parser does (later values win). */
function parseMeasureOptions(format: ImageFormat, text: string | undefined): OptionValues {
  const defs = [...createOptionsOf(format), ...(format === 'qcow2' ? ENCRYPTION_OPTIONS : []), ...PROTOCOL_OPTIONS];
  const values: OptionValues = new Map();
  if (text === undefined) return values;
  try {
    for (const item of splitOptionString(text)) {
      const eq = item.indexOf('=');
      const name = eq < 0 ? item : item.slice(0, eq);
      const value = eq < 0 ? 'on' : item.slice(eq + 1);
      const def = defs.find((d) => d.name === name);
      if (!def) throw fail(`Invalid parameter '${name}'`);
      if (def.type === 'size') parseOptionSize(name, value);
      else if (def.type === 'bool') parseOptionBool(name, value);
      else if (def.type === 'num') parseOptionNumber(name, value);
      values.set(name, value);
    }
  } catch (error) {
    const cause = asQcow2Error(error);
    throw new Qcow2Error(cause.code, lines(cause.message, `Invalid options for file format '${format}'`), { cause });
  }
  return values;
}

/** The library's options from -O, -o and --size. */
function measureOptions(format: ImageFormat, values: OptionValues, size: bigint | undefined): MeasureOptions {
  const text = (name: string) => values.get(name);
  const number = (name: string, parse: (name: string, value: string) => number) => {
    const value = text(name);
    return value === undefined ? undefined : parse(name, value);
  };
  const optionSize = text('size') === undefined ? undefined : BigInt(parseOptionSize('size', text('size')!));
  return {
    outputFormat: format,
    size: size ?? optionSize,
    clusterSize: number('cluster_size', parseOptionSize),
    refcountBits: number('refcount_bits', parseOptionNumber),
    extendedL2: text('extended_l2') === undefined ? undefined : parseOptionBool('extended_l2', text('extended_l2')!),
    compat: text('compat') as MeasureOptions['compat'],
    preallocation: text('preallocation') as MeasureOptions['preallocation'],
    backingFile: text('backing_file'),
    encryptFormat: text('encrypt.format'),
    encryptKeySecret: text('encrypt.key-secret'),
  };
}

/** What the command line asks for, checked in qemu-img's order up to opening the image. */
interface Request {
  output: 'human' | 'json';
  outputFormat: string;
  optionText?: string;
  size?: bigint;
  filename?: string;
  format?: string;
  snapshot?: SnapshotSelector | string;
}

function parseRequest(args: ParsedArgs): Request {
  if (hasFlag(args, 'object')) throw new UsageError('--object is not supported by qcow2 measure');
  if (hasFlag(args, 'image-opts')) throw new UsageError('--image-opts is not supported by qcow2 measure');
  let output: 'human' | 'json' = 'human';
  for (const text of args.options.get('output') ?? []) output = parseOutput(text);
  let size: bigint | undefined;
  for (const text of args.options.get('size') ?? []) {
    size = cvtnum('image size', text, 0n, undefined, (warning) => process.stderr.write(`qcow2: ${warning}\n`));
  }
  const optionTexts = args.options.get('o') ?? [];
  optionTexts.forEach(checkOptionList);
  let snapshot: SnapshotSelector | string | undefined;
  for (const text of args.options.get('l') ?? []) snapshot = parseSnapshotParam(text);
  if (args.positional.length > 1) throw fail('At most one filename argument is allowed.');
  const filename = args.positional[0];
  const formatText = args.options.get('f')?.at(-1);
  if (filename === undefined && (formatText !== undefined || snapshot !== undefined)) {
    throw fail('--image-opts, -f, and -l require a filename argument.');
  }
  if (filename !== undefined && size !== undefined) throw fail('--size N cannot be used together with a filename.');
  if (filename === undefined && size === undefined) throw fail('Either --size N or one filename must be specified.');
  return {
    output,
    outputFormat: args.options.get('O')?.at(-1) ?? 'raw',
    optionText: optionTexts.length > 0 ? optionTexts.join(',') : undefined,
    size,
    filename,
    format: formatText,
    snapshot,
  };
}

/** The figures as qemu-img prints them: human lines, or its pretty JSON object. */
export function formatMeasure(result: MeasureResult, output: 'human' | 'json'): string {
  if (output === 'human') {
    const text = `required size: ${result.required}\nfully allocated size: ${result.fullyAllocated}\n`;
    return result.bitmaps === undefined ? text : `${text}bitmaps size: ${result.bitmaps}\n`;
  }
  const fields = [
    ...(result.bitmaps === undefined ? [] : [`    "bitmaps": ${result.bitmaps}`]),
    `    "required": ${result.required}`,
    `    "fully-allocated": ${result.fullyAllocated}`,
  ];
  return `{\n${fields.join(',\n')}\n}\n`;
}

/**
 * Open an input image as qemu-img does; a file that cannot be opened at all reads
 * "Could not open 'PATH': Could not open 'PATH': REASON" as in qemu-img, even before its format is probed.
 */
export async function openInput(path: string, formatName: string | undefined): Promise<Image> {
  const format = inputFormatOf(path, formatName);
  try {
    const probe = await openMetadataFile(path);
    await probe.handle.close();
  } catch (error) {
    const cause = asQcow2Error(error);
    throw new Qcow2Error(cause.code, `Could not open '${path}': ${cause.message}`, { cause });
  }
  return openImage(path, { format });
}

/** The format named by -f; one this package cannot read is refused as qemu-img refuses a driver it does not know. */
function inputFormatOf(path: string, name: string | undefined): ImageFormat | undefined {
  if (name === undefined || name === 'raw' || name === 'qcow2') return name;
  if (OTHER_CREATABLE_FORMATS.includes(name) || NON_CREATABLE_FORMATS.includes(name)) {
    throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `Could not open '${path}': format '${name}' is not supported (raw, qcow2)`);
  }
  throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `Could not open '${path}': Unknown driver '${name}'`);
}

/** Open the image to measure (at a snapshot with -l); a snapshot that cannot be loaded reads "Failed to load snapshot: …". */
async function openSource(request: Request): Promise<Image> {
  const image = await openInput(request.filename!, request.format);
  if (request.snapshot === undefined) return image;
  await image.close();
  try {
    return await openAtSnapshot(request.filename!, request.snapshot, { format: image.format, followFileNames: true });
  } catch (error) {
    const cause = asQcow2Error(error);
    throw new Qcow2Error(cause.code, `Failed to load snapshot: ${cause.message}`, { cause });
  }
}

/** Run `qcow2 measure` with `argv`; resolves to the exit code. */
export async function run(argv: string[]): Promise<number> {
  let args: ParsedArgs;
  try {
    args = parseArgs(argv, SPEC);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    // qemu-img measure lets getopt complain, then shows its help and exits 0.
    process.stderr.write(`measure: ${error.message}\n`);
    process.stdout.write(USAGE);
    return 0;
  }
  if (hasFlag(args, 'h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  const request = parseRequest(args);
  const source = request.filename === undefined ? undefined : await openSource(request);
  try {
    const format = outputFormatOf(request.outputFormat);
    const values = parseMeasureOptions(format, request.optionText);
    const result = await measure(source, measureOptions(format, values, request.size));
    process.stdout.write(formatMeasure(result, request.output));
  } finally {
    await source?.close();
  }
  return 0;
}
