/** Option handling the chain commands (rebase, commit, amend) share: refused qemu options, the image format. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import type { ImageFormat } from '../image.js';
import { probeFormat } from '../open.js';
import { rawProbeWarning } from '../tools/io/probe-guard.js';
import { ArgSpec, ParsedArgs, UsageError, parseArgs, qemuUsage } from './args.js';
import { hasFlag } from './common.js';

/**
 * The command line of a chain command: parsed with qemu-img's usage messages, -h answered with
 * `usage` (then undefined: nothing more to do), --object and --image-opts refused.
 */
export function parseChainCommand(argv: string[], spec: ArgSpec, usage: string): ParsedArgs | undefined {
  let args;
  try {
    args = parseArgs(argv, spec);
  } catch (error) {
    if (error instanceof UsageError) throw qemuUsage(error, argv);
    throw error;
  }
  if (hasFlag(args, 'h')) {
    process.stdout.write(usage);
    return undefined;
  }
  refuseObjectOptions(args);
  return args;
}

/** --object and --image-opts (secrets, option strings instead of file names) are refused with an error naming them, never ignored. */
export function refuseObjectOptions(args: ParsedArgs): void {
  for (const name of ['object', 'image-opts']) {
    if (hasFlag(args, name)) throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `--${name} is not supported`);
  }
}

/** The image format given by -f; other names fail as qemu-img fails to open the image with them. */
export function imageFormatOption(text: string | undefined, file: string): ImageFormat | undefined {
  if (text === undefined || text === 'raw' || text === 'qcow2') return text;
  throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `Could not open '${file}': Unknown driver '${text}'`);
}

/** qemu-img's warning on stderr when an image it opens for writing has no -f and probes as raw. */
export async function warnIfProbedRaw(file: string, format: ImageFormat | undefined): Promise<void> {
  if (format !== undefined) return;
  const probed = await probeFormat(file).catch(() => undefined);
  if (probed === 'raw') process.stderr.write(rawProbeWarning(file));
}
