/** An interactive qemu-io session: the open image, where text goes, and the requests still running. */
import { rm } from 'node:fs/promises';
import path from 'node:path';

import type { Image, ImageFormat } from '../../image.js';
import type { CacheMode } from '../../native.js';
import { corruptionNotice, errorText } from './format.js';

/** qemu-io's default host cache mode: writethrough, every write durable before it completes. */
export const IO_DEFAULT_CACHE = 'writethrough';

/** Thrown by a command whose operands do not fit its syntax: the command's usage line is printed. */
export class ShowUsage extends Error {}

/** Where a session writes: stdout text, and stderr text (`error` adds the program prefix). */
export interface IoOutput {
  out(text: string): void;
  err(text: string): void;
}

/** What `open` (and the command line) ask of the opener. */
export interface IoOpenRequest {
  path: string;
  format?: ImageFormat;
  readOnly: boolean;
  cache: CacheMode;
  /** The image is opened again (reopen): warnings already given are not repeated. */
  again?: boolean;
  /** Snapshot mode (qemu-io -s): writes go to a temporary overlay, dropped when the image is closed. */
  snapshot?: boolean;
  /** The temporary overlay a snapshot-mode open made (the opener sets it; reopen keeps using it). */
  overlay?: string;
}

/** Opens images for a session; the CLI decides how (file names followed, cache defaults). */
export type IoOpener = (request: IoOpenRequest) => Promise<Image>;

/** The state commands share. */
export class IoSession {
  image: Image | undefined;
  /** How the open image was opened, for reopen. */
  opened: IoOpenRequest | undefined;
  /** Asynchronous requests (aio_read, aio_write) not yet finished. */
  readonly pending = new Set<Promise<void>>();

  constructor(
    readonly output: IoOutput,
    readonly opener: IoOpener,
    /** Prefix of messages qemu-io reports through error_report ("qemu-io: " there). */
    readonly prefix: string,
  ) {}

  /** Write `text` to stdout. */
  out(text: string): void {
    this.output.out(text);
  }

  /** Write `text` to stderr as it is. */
  err(text: string): void {
    this.output.err(text);
  }

  /**
   * Report a failed request on stdout as qemu-io does (`NAME failed: REASON`); the failure that
   * marked the image corrupt is also announced on stderr first, in qcow2's words.
   */
  failed(name: string, error: unknown): void {
    const notice = corruptionNotice(error);
    if (notice !== undefined) this.output.err(notice);
    this.output.out(`${name} failed: ${errorText(error)}\n`);
  }

  /** Report an error on stderr with the program prefix, like qemu's error_report. */
  error(message: string): void {
    this.output.err(`${this.prefix}${message}\n`);
  }

  /** Start an asynchronous request; aio_flush and close wait for it. */
  track(request: Promise<void>): void {
    const settled = request.finally(() => this.pending.delete(settled));
    this.pending.add(settled);
  }

  /** Wait until every asynchronous request has finished. */
  async drain(): Promise<void> {
    while (this.pending.size > 0) await Promise.allSettled([...this.pending]);
  }

  /** Finish running requests and close the image, if one is open. */
  async closeImage(): Promise<void> {
    await this.drain();
    const image = this.image;
    const overlay = this.opened?.overlay;
    this.image = undefined;
    this.opened = undefined;
    try {
      await image?.close();
    } finally {
      if (overlay !== undefined) await rm(path.dirname(overlay), { recursive: true, force: true });
    }
  }
}
