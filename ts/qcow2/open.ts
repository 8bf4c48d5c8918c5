/** Opening qcow2 images: header, engine and backing chain. Being written (engine work). */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import type { Image } from '../image.js';
import type { OpenOptions } from '../open.js';

export async function openQcow2(path: string, _options: OpenOptions): Promise<Image> {
  throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `opening qcow2 image '${path}': the qcow2 engine is not built yet`);
}
