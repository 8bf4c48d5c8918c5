/** Every failure this package reports is a Qcow2Error with a stable `code`. */

/** The codes this package defines itself; errors from the operating system keep their errno name (ENOENT, EIO, …). */
export const ErrorCodes = {
  /** An argument passed to the API or the CLI is wrong. */
  INVALID_ARGUMENT: 'ERR_QCOW2_INVALID_ARGUMENT',
  /** The qcow2 header or one of its extensions is malformed. */
  INVALID_HEADER: 'ERR_QCOW2_INVALID_HEADER',
  /** The file is not of the format that was asked for. */
  WRONG_FORMAT: 'ERR_QCOW2_WRONG_FORMAT',
  /** A qcow2 version other than 2 or 3. */
  UNSUPPORTED_VERSION: 'ERR_QCOW2_UNSUPPORTED_VERSION',
  /** An encrypted image (crypt_method ≠ 0). */
  ENCRYPTED: 'ERR_QCOW2_ENCRYPTED',
  /** An incompatible feature bit this package does not know. */
  UNKNOWN_FEATURE: 'ERR_QCOW2_UNKNOWN_FEATURE',
  /** Something this package does not support (yet); the message says what. */
  UNSUPPORTED: 'ERR_QCOW2_UNSUPPORTED',
  /** Metadata that contradicts itself: an entry out of bounds, unaligned, or otherwise impossible. */
  CORRUPT: 'ERR_QCOW2_CORRUPT',
  /** A request outside the disk, or an offset outside the file. */
  OUT_OF_BOUNDS: 'ERR_QCOW2_OUT_OF_BOUNDS',
  /** A write to an image opened read-only. */
  READ_ONLY: 'ERR_QCOW2_READ_ONLY',
  /** The image names a file (backing file, data file) and the caller did not allow following it. */
  FILE_NAME_NOT_ALLOWED: 'ERR_QCOW2_FILE_NAME_NOT_ALLOWED',
  /** A backing chain that leads back to one of its own images. */
  BACKING_LOOP: 'ERR_QCOW2_BACKING_LOOP',
  /** A backing chain deeper than the limit. */
  CHAIN_TOO_DEEP: 'ERR_QCOW2_CHAIN_TOO_DEEP',
  /** The image is closed. */
  CLOSED: 'ERR_QCOW2_CLOSED',
  /** The operation was aborted through its AbortSignal. */
  ABORTED: 'ABORT_ERR',
} as const;

/** A code this package defines: one of the ErrorCodes values. */
export type Qcow2ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

/** The one error class of this package: `code` is an ErrorCodes value or an errno name. */
export class Qcow2Error extends Error {
  readonly code: string;

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'Qcow2Error';
    this.code = code;
  }
}

/** Turn anything thrown (a native error with `code`, a Node error) into a Qcow2Error, keeping its code. */
export function asQcow2Error(error: unknown): Qcow2Error {
  if (error instanceof Qcow2Error) return error;
  if (error instanceof Error) {
    const code = (error as NodeJS.ErrnoException).code;
    return new Qcow2Error(typeof code === 'string' ? code : 'EIO', error.message, { cause: error });
  }
  return new Qcow2Error('EIO', String(error));
}

/** Await a promise, rethrowing its rejection as a Qcow2Error. */
export async function settle<T>(promise: Promise<T>): Promise<T> {
  try {
    return await promise;
  } catch (error) {
    throw asQcow2Error(error);
  }
}

/** Throw ERR_QCOW2_INVALID_ARGUMENT unless `ok`. */
export function check(ok: boolean, message: string): asserts ok {
  if (!ok) throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, message);
}
