/**
 * Rewriting the header area of a qcow2 image in place: the one path rebase and amend change
 * header fields and extensions through (backing file and format, version, feature bits, data file).
 *
 * Crash safety: a caller first makes everything the new header refers to durable (data copied,
 * engine closed and flushed); the new header area is then built and checked in memory, written
 * with a single write at offset 0 and flushed. Until that write lands, the image is the old one,
 * complete; after it, the new one. A header area within one 512-byte sector (any version 2
 * header, most version 3 ones without a feature-name table) is replaced atomically by the disk;
 * a longer one is replaced by one request, as qemu's header update does.
 */
import { ErrorCodes, Qcow2Error, asQcow2Error, settle } from '../errors.js';
import { NativeFile, native } from '../native.js';
import { Qcow2Header, clearUnknownAutoclear, parseHeader, readHeader, serializeHeader } from './header.js';

/** The change a rewrite makes: the header as it is now, in; the header to store, out. */
export type HeaderChange = (header: Qcow2Header) => Qcow2Header;

/**
 * The bytes of the new header cluster: the serialised header area, zero-filled to the end of the
 * cluster (or of the file, when it is shorter), as qemu leaves it. A header area larger than the
 * first cluster, which is all the room the format gives it, is refused with ENOSPC and nothing
 * is written (qemu fails the same way: "No space left in the file header").
 */
export function headerCluster(header: Qcow2Header, fileSize: number): Buffer {
  const area = serializeHeader(header, Number.MAX_SAFE_INTEGER);
  if (area.length > header.clusterSize) {
    throw new Qcow2Error(
      'ENOSPC',
      `No space left in the file header: the header area would take ${area.length} bytes, more than the first cluster (${header.clusterSize} bytes)`,
    );
  }
  const out = Buffer.alloc(Math.max(area.length, Math.min(header.clusterSize, fileSize)));
  area.copy(out);
  return out;
}

/** Write `bytes` at offset 0 of `path` and flush them to disk. */
async function writeAndFlush(path: string, bytes: Buffer): Promise<void> {
  let file: NativeFile | undefined;
  try {
    file = await settle(native.NativeFile.open(path, { writable: true, cache: 'writeback' }));
    await settle(file.write(bytes, 0));
    await settle(file.flush());
  } finally {
    await file?.close();
  }
}

/**
 * Rewrite the header of the qcow2 image at `path` with `change` applied; resolves to the header
 * stored. The image must not be open for writing elsewhere (an engine keeps header fields of its
 * own): callers close their writable Image first. A dirty or corrupt image is refused (open it
 * writable first: that rebuilds the refcounts and clears the dirty bit). Autoclear bits this
 * package does not know are cleared, as any writer must.
 */
export async function rewriteHeader(path: string, change: HeaderChange): Promise<Qcow2Header> {
  const { header, fileSize } = await readHeader(path);
  if (header.dirty || header.corrupt) {
    throw new Qcow2Error(
      header.corrupt ? ErrorCodes.CORRUPT : ErrorCodes.INVALID_ARGUMENT,
      `image '${path}' is ${header.corrupt ? 'marked corrupt' : 'dirty (refcounts not up to date)'}: its header is not rewritten`,
    );
  }
  // The change sees the bits a writer keeps; the booleans it sets are what gets stored.
  const updated = change(clearUnknownAutoclear(header));
  const bytes = headerCluster(updated, fileSize);
  // Parsing what is about to be written catches any inconsistency before the image is touched.
  try {
    parseHeader(bytes, Math.max(fileSize, bytes.length));
  } catch (error) {
    const cause = asQcow2Error(error);
    throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `the new header of '${path}' would be invalid: ${cause.message}`, { cause });
  }
  await writeAndFlush(path, bytes);
  return updated;
}
