/** Option handling the chain commands (rebase, commit, amend) share: refused qemu options, the image format. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import type { ImageFormat } from '../image.js';
import { ParsedArgs } from './args.js';
import { hasFlag } from './common.js';

/** --object and --image-opts (secrets, option strings instead of file names) are not implemented: say so instead of ignoring them. */
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
