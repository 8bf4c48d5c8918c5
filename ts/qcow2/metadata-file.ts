/** Bounded async reads of image metadata (header, snapshot table, bitmap directory) with node:fs. */
import { constants } from 'node:fs';
import { open as fsOpen, FileHandle } from 'node:fs/promises';

import { ErrorCodes, Qcow2Error } from '../errors.js';

/** An image file opened read-only for metadata parsing. */
export interface MetadataFile {
  readonly path: string;
  readonly handle: FileHandle;
  /** File size in bytes at open time. */
  readonly size: number;
  /** Bytes allocated on disk (st_blocks * 512), what qemu-img calls "disk size". */
  readonly allocated: number;
  /** Device and inode ("dev:ino"): the same file reached by two names has the same identity. */
  readonly identity: string;
}

/** strerror() wording for the errors an open commonly meets, so messages read like qemu-img's. */
const ERRNO_TEXT: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EPERM: 'Operation not permitted',
  EISDIR: 'Is a directory',
  ENOTDIR: 'Not a directory',
  ELOOP: 'Too many levels of symbolic links',
  ENAMETOOLONG: 'File name too long',
  EMFILE: 'Too many open files',
  ENFILE: 'Too many open files in system',
  EIO: 'Input/output error',
  ENXIO: 'No such device or address',
};

/** The strerror-style text of a Node error, falling back to Node's own message. */
export function errnoText(error: unknown): { code: string; text: string } {
  const e = error as NodeJS.ErrnoException;
  const code = typeof e?.code === 'string' ? e.code : 'EIO';
  return { code, text: ERRNO_TEXT[code] ?? (e instanceof Error ? e.message : String(error)) };
}

/** Open `path` read-only; failures say "Could not open 'path': <reason>" with the errno as code. */
export async function openMetadataFile(path: string): Promise<MetadataFile> {
  let handle: FileHandle | undefined;
  try {
    // Non-blocking: opening a FIFO would otherwise wait for a writer (the check below refuses it).
    handle = await fsOpen(path, constants.O_RDONLY | constants.O_NONBLOCK);
    const stat = await handle.stat({ bigint: true });
    if (!stat.isFile()) {
      throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `'file' driver requires '${path}' to be a regular file`);
    }
    return { path, handle, size: Number(stat.size), allocated: Number(stat.blocks) * 512, identity: `${stat.dev}:${stat.ino}` };
  } catch (error) {
    await handle?.close();
    if (error instanceof Qcow2Error) throw error;
    const { code, text } = errnoText(error);
    throw new Qcow2Error(code, `Could not open '${path}': ${text}`, { cause: error });
  }
}

/**
 * Read exactly `length` bytes at `offset`. The caller bounds `length`; this checks that the range
 * lies inside the file, naming `what` in the error.
 */
export async function readRange(file: MetadataFile, offset: number, length: number, what: string): Promise<Buffer> {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > file.size) {
    throw new Qcow2Error(
      ErrorCodes.CORRUPT,
      `${what} at offset ${offset} with length ${length} ends past the end of the file (${file.size} bytes)`,
    );
  }
  const buffer = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    let bytesRead: number;
    try {
      ({ bytesRead } = await file.handle.read(buffer, done, length - done, offset + done));
    } catch (error) {
      const { code, text } = errnoText(error);
      throw new Qcow2Error(code, `Could not read ${what} of '${file.path}': ${text}`, { cause: error });
    }
    if (bytesRead === 0) {
      throw new Qcow2Error(ErrorCodes.CORRUPT, `${what} of '${file.path}' is cut short: the file shrank while being read`);
    }
    done += bytesRead;
  }
  return buffer;
}
