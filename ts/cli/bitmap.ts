/** `qcow2 bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b FILE [-F FMT]] [-g GRANULARITY] [-f FMT] FILENAME BITMAP`: qemu-img bitmap. */
import { BitmapAction, bitmap } from '../tools/bitmap.js';
import { ParsedArgs, UsageError, lastOption, parseArgs, parseSize, qemuUsage } from './args.js';
import { parseFormat } from './common.js';

const USAGE = `usage: qcow2 bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap

Change the persistent dirty bitmap BITMAP of FILENAME, action by action, as qemu-img bitmap does.
  --add                 add BITMAP (enabled; -g sets its granularity)
  --remove              remove BITMAP
  --clear               clear every bit of BITMAP
  --enable, --disable   have BITMAP record writes, or not
  --merge SOURCE        set in BITMAP the bits of bitmap SOURCE (of -b source_file, else of FILENAME)
`;

const FLAGS = ['add', 'remove', 'clear', 'enable', 'disable'] as const;

const SPEC = {
  short: 'b:F:g:f:h',
  long: {
    help: { value: false, key: 'h' },
    object: { value: true },
    'image-opts': { value: false },
    merge: { value: true },
    ...Object.fromEntries(FLAGS.map((f) => [f, { value: false }])),
  },
};

/** Options whose value is the next argument (skipped when the actions are read in order). */
const VALUED = new Set(['-b', '-F', '-g', '-f', '--object', '--merge']);

/** The actions in command-line order (getopt's order, which the option map does not keep). */
function actionsOf(argv: readonly string[]): BitmapAction[] {
  const actions: BitmapAction[] = [];
  for (let i = 0; i < argv.length && argv[i] !== '--'; i++) {
    const arg = argv[i];
    const flag = FLAGS.find((f) => arg === `--${f}`);
    if (flag) actions.push({ kind: flag });
    else if (arg === '--merge') actions.push({ kind: 'merge', source: argv[++i] });
    else if (arg.startsWith('--merge=')) actions.push({ kind: 'merge', source: arg.slice('--merge='.length) });
    else if (VALUED.has(arg)) i++;
  }
  return actions;
}

function parse(argv: string[]): ParsedArgs {
  try {
    return parseArgs(argv, SPEC);
  } catch (error) {
    throw error instanceof UsageError ? qemuUsage(error, argv) : error;
  }
}

/** -g's value, or qemu-img's complaint about it. */
function granularityOf(args: ParsedArgs): number | undefined {
  const text = lastOption(args, 'g');
  if (text === undefined) return undefined;
  try {
    return parseSize(text);
  } catch {
    throw new UsageError(
      'Invalid granularity specified. You may use k, M, G, T, P or E suffixes for\n' +
        'qcow2: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
  }
}

/** Run `qcow2 bitmap`; errors propagate to main, which prints them qemu-img style and exits 1. */
export async function run(argv: string[]): Promise<number> {
  const args = parse(argv);
  if (args.options.has('h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (args.options.has('object')) throw new UsageError('--object is not supported');
  if (args.options.has('image-opts')) throw new UsageError('--image-opts is not supported');
  const actions = actionsOf(argv);
  if (actions.length === 0) throw new UsageError('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  if (args.positional.length !== 2) throw new UsageError('Expecting filename and bitmap name');
  const granularity = granularityOf(args);
  const [path, name] = args.positional;
  await bitmap(path, name, actions, {
    granularity,
    sourceFile: lastOption(args, 'b'),
    sourceFormat: parseFormat(lastOption(args, 'F')),
    format: parseFormat(lastOption(args, 'f')),
    onWarning: (text) => process.stderr.write(text),
  });
  return 0;
}
