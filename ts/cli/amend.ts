/** `qcow2 amend [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename`, as qemu-img amend. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import { AmendChanges, amend } from '../tools/amend.js';
import { openChainImage } from '../tools/chain-open.js';
import { isHelpRequest, parseOptionBool, parseOptionNumber, parseOptionSize, splitOptionString } from '../tools/qemu-options.js';
import { HELP_HINT, UsageError, lastOption } from './args.js';
import { imageFormatOption, parseChainCommand, warnIfProbedRaw } from './chain-options.js';
import { DEFAULT_CACHE, ProgressPrinter, hasFlag, parseCache } from './common.js';

const SPEC = {
  short: 'ho:f:t:pq',
  long: {
    help: { value: false, key: 'h' },
    object: { value: true },
    'image-opts': { value: false },
    force: { value: false },
  },
};

const USAGE = 'usage: qcow2 amend [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename\n';

/** The options qemu-img amend takes for qcow2, with their value types, as `-o help` lists them. */
const AMEND_OPTIONS: readonly { name: string; type: string; help: string }[] = [
  { name: 'backing_file', type: 'str', help: 'File name of a base image' },
  { name: 'backing_fmt', type: 'str', help: 'Image format of the base image' },
  { name: 'compat', type: 'str', help: 'Compatibility level (v2 [0.10] or v3 [1.1])' },
  { name: 'data_file', type: 'str', help: 'File name of an external data file' },
  { name: 'data_file_raw', type: 'bool (on/off)', help: 'The external data file must stay valid as a raw image' },
  { name: 'encrypt.iter-time', type: 'num', help: 'Time to spend in PBKDF in milliseconds' },
  { name: 'encrypt.keyslot', type: 'num', help: 'Select a single keyslot to modify explicitly' },
  { name: 'encrypt.new-secret', type: 'str', help: 'New secret to set in the matching keyslots. Empty string to erase' },
  { name: 'encrypt.old-secret', type: 'str', help: 'Select all keyslots that match this password' },
  { name: 'encrypt.state', type: 'str', help: 'Select new state of affected keyslots (active/inactive)' },
  { name: 'lazy_refcounts', type: 'bool (on/off)', help: 'Postpone refcount updates' },
  { name: 'refcount_bits', type: 'num', help: 'Width of a reference count entry in bits' },
  { name: 'size', type: 'size', help: 'Virtual disk size' },
];

/** Options qemu-img takes only when creating a qcow2 image. */
const CREATE_ONLY = [
  'cluster_size',
  'extended_l2',
  'preallocation',
  'compression_type',
  'encryption',
  'encrypt.format',
  'encrypt.key-secret',
  'encrypt.cipher-alg',
  'encrypt.cipher-mode',
  'encrypt.ivgen-alg',
  'encrypt.ivgen-hash-alg',
  'encrypt.hash-alg',
];

function optionHelp(): string {
  const lines = ["Amend options for 'qcow2':"];
  for (const o of AMEND_OPTIONS) lines.push(`  ${`${o.name}=<${o.type}>`.padEnd(22)} - ${o.help}`);
  return lines.join('\n') + '\n';
}

/** Parse "-o" text into the changes amend() takes, with qemu's complaints for unknown names and bad values. */
export function parseAmendOptions(text: string): AmendChanges {
  const changes: AmendChanges = {};
  for (const item of splitOptionString(text)) {
    const eq = item.indexOf('=');
    const name = eq < 0 ? item : item.slice(0, eq);
    const value = eq < 0 ? 'on' : item.slice(eq + 1);
    const def = AMEND_OPTIONS.find((o) => o.name === name);
    if (!def) {
      const hint = CREATE_ONLY.includes(name) ? '\nThis option is only supported for image creation' : '';
      throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `Invalid parameter '${name}'${hint}`);
    }
    applyOption(changes, name, value);
  }
  return changes;
}

function applyOption(changes: AmendChanges, name: string, value: string): void {
  switch (name) {
    case 'compat':
      changes.compat = value as AmendChanges['compat'];
      return;
    case 'lazy_refcounts':
      changes.lazyRefcounts = parseOptionBool(name, value);
      return;
    case 'size':
      changes.size = parseOptionSize(name, value);
      return;
    case 'backing_file':
      changes.backingFile = value;
      return;
    case 'backing_fmt':
      changes.backingFormat = value;
      return;
    case 'data_file':
      changes.dataFile = value;
      return;
    case 'data_file_raw':
      changes.dataFileRaw = parseOptionBool(name, value);
      return;
    case 'refcount_bits':
      changes.refcountBits = parseOptionNumber(name, value);
      return;
    default:
      if (name.startsWith('encrypt.')) changes.encryption = true;
  }
}

/** Run `qcow2 amend` with `argv`; resolves to the exit code. */
export async function run(argv: string[]): Promise<number> {
  const args = parseChainCommand(argv, SPEC, USAGE);
  if (!args) return 0;
  const texts = args.options.get('o');
  if (!texts) throw new UsageError(`Must specify options (-o)${HELP_HINT}`);
  const options = texts.join(',');
  const formatText = lastOption(args, 'f');
  if (formatText !== undefined && isHelpRequest(options)) {
    process.stdout.write(optionHelp());
    return 0;
  }
  const progress = new ProgressPrinter(hasFlag(args, 'p') && !hasFlag(args, 'q'), 1);
  try {
    if (args.positional.length !== 1) throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, 'Expecting one image file name');
    const file = args.positional[0];
    const cache = parseCache(lastOption(args, 't'), 'cache') ?? DEFAULT_CACHE;
    const format = imageFormatOption(formatText, file);
    await warnIfProbedRaw(file, format);
    // qemu-img opens the image (and its backing chain) before it looks at the options: its open errors come first.
    const image = await openChainImage(file, { format, cache, readOnly: true, followFileNames: true });
    await image.close();
    if (image.format !== 'qcow2') throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `Format driver '${image.format}' does not support option amendment`);
    if (isHelpRequest(options)) {
      process.stdout.write(optionHelp());
      return 0;
    }
    const changes = parseAmendOptions(options);
    progress.set(0);
    try {
      await amend(file, { ...changes, format, cache, followFileNames: true });
    } finally {
      progress.set(100);
    }
  } finally {
    progress.end();
  }
  return 0;
}
