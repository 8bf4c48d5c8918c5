/** qemu-io's number syntax and output formats: sizes, times, statistics lines, hex dumps, errno text. */
import { ErrorCodes, Qcow2Error } from '../../errors.js';

/** The longest single request qemu accepts: INT_MAX rounded down to 512 bytes. */
export const MAX_REQUEST_BYTES = 2147483136;

const UNIT_SCALE: Record<string, number> = { b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

/** A number qemu-io refused, with the message qemu-io prints for it. */
export class ParseError extends Qcow2Error {
  constructor(message: string) {
    super(ErrorCodes.INVALID_ARGUMENT, message);
  }
}

/**
 * qemu's size syntax for offsets and lengths: decimal or 0x hex, then an optional unit
 * (b, k, M, G, T, P, E in either case, powers of 1024); a fraction only with a unit above b.
 */
export function parseNumber(text: string): number {
  const m = /^(0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?)([bBkKmMgGtTpPeE]?)$/.exec(text.trimStart());
  if (!m || (m[1].includes('.') && (m[2] === '' || m[2].toLowerCase() === 'b'))) {
    throw new ParseError(`Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${text}`);
  }
  const scale = m[2] ? UNIT_SCALE[m[2].toLowerCase()] : 1;
  const value = /^0[xX]/.test(m[1]) ? Number.parseInt(m[1], 16) : Number(m[1]);
  const result = Math.floor(value * scale);
  // qemu takes anything below 2^63; past 2^53 the Image API refuses the request itself.
  if (!(result < 2 ** 63)) throw new ParseError(`Parsing error: argument too large -- ${text}`);
  return result;
}

/** A request length: a number no larger than one request may be. */
export function parseLength(text: string): number {
  const value = parseNumber(text);
  if (value > MAX_REQUEST_BYTES) throw new ParseError(`length cannot exceed ${MAX_REQUEST_BYTES}, given ${text}`);
  return value;
}

/** A pattern byte as C's strtol with base 0 reads it (0x hex, 0 octal, else decimal), 0..255. */
export function parsePattern(text: string): number {
  const ok = /^(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)$/.exec(text);
  const value = !ok ? NaN : /^0[xX]/.test(text) ? Number.parseInt(text, 16) : text.startsWith('0') ? Number.parseInt(text, 8) : Number(text);
  if (!(value >= 0 && value <= 255)) throw new ParseError(`${text} is not a valid pattern byte`);
  return value;
}

/**
 * printf("%.Nf", value) for value >= 0: the exact binary value rounded, ties to even as glibc does
 * (toFixed alone rounds ties up: 2.0625 must print as 2.062).
 */
export function printfFixed(value: number, digits: number): string {
  if (!Number.isFinite(value)) return value > 0 ? 'inf' : 'nan';
  if (value >= 1e21) return value.toFixed(digits);
  const exact = value.toFixed(100);
  const point = exact.indexOf('.');
  const kept = BigInt(exact.slice(0, point) + exact.slice(point + 1, point + 1 + digits));
  const rest = exact.slice(point + 1 + digits);
  const above = rest > '5' + '0'.repeat(rest.length - 1);
  const tie = rest === '5' + '0'.repeat(rest.length - 1);
  const rounded = above || (tie && kept % 2n === 1n) ? kept + 1n : kept;
  const text = rounded.toString().padStart(digits + 1, '0');
  return digits === 0 ? text : `${text.slice(0, -digits)}.${text.slice(-digits)}`;
}

/** A byte count in qemu-io's style: "64 KiB", "1.500 KiB", "40 bytes", "482.210530 bytes". */
export function cvtstr(value: number): string {
  const units: [number, string][] = [
    [2 ** 60, 'EiB'],
    [2 ** 50, 'PiB'],
    [2 ** 40, 'TiB'],
    [2 ** 30, 'GiB'],
    [2 ** 20, 'MiB'],
    [2 ** 10, 'KiB'],
  ];
  const unit = units.find(([scale]) => value >= scale);
  // Bytes keep six decimals, larger units three; an all-zero fraction is dropped.
  const text = unit ? printfFixed(value / unit[0], 3) : printfFixed(value, 6);
  const cut = text.indexOf('.000');
  return `${cut >= 0 ? text.slice(0, cut) : text} ${unit ? unit[1] : 'bytes'}`;
}

/** Seconds as qemu-io prints an elapsed time: "00.05 sec" under a minute, else "h:mm:ss.ss". */
export function timestr(seconds: number, verbose = false): string {
  const whole = Math.floor(seconds);
  const hours = Math.floor(whole / 3600);
  const minutes = Math.floor((whole % 3600) / 60);
  const secs = printfFixed(seconds - hours * 3600 - minutes * 60, 2).padStart(5, '0');
  if (!verbose && hours === 0 && minutes === 0) return `${secs} sec`;
  return `${hours}:${String(minutes).padStart(2, '0')}:${secs}`;
}

/** The statistics qemu-io prints after a request: human lines, or one CSV line with -C. */
export function report(what: string, offset: number, total: number, count: number, seconds: number, csv: boolean): string {
  const rate = total / seconds;
  const ops = count / seconds;
  if (csv) return `${total},${count},${timestr(seconds, true)},${printfFixed(rate, 3)},${printfFixed(ops, 3)}\n`;
  return (
    `${what} ${total}/${total} bytes at offset ${offset}\n` +
    `${cvtstr(total)}, ${count} ops; ${timestr(seconds)} (${cvtstr(rate)}/sec and ${printfFixed(ops, 4)} ops/sec)\n`
  );
}

/** qemu-io's -v dump: 16 bytes a line, "%08x:  " then hex bytes then letters and digits (others as '.'). */
export function dumpBuffer(buffer: Uint8Array, offset: number): string {
  const lines: string[] = [];
  for (let i = 0; i < buffer.length; i += 16) {
    const row = buffer.subarray(i, Math.min(i + 16, buffer.length));
    const hex = Array.from(row, (b) => b.toString(16).padStart(2, '0')).join(' ');
    const text = Array.from(row, (b) => (/[0-9A-Za-z]/.test(String.fromCharCode(b)) ? String.fromCharCode(b) : '.')).join('');
    lines.push(`${(offset + i).toString(16).padStart(8, '0')}:  ${hex}  ${text}\n`);
  }
  return lines.join('');
}

/** strerror() wording for the error codes requests meet; anything else reads as an I/O error, as in qemu. */
const ERRNO_TEXT: Record<string, string> = {
  EIO: 'Input/output error',
  ENOSPC: 'No space left on device',
  ENOTSUP: 'Operation not supported',
  EOPNOTSUPP: 'Operation not supported',
  [ErrorCodes.UNSUPPORTED]: 'Operation not supported',
  EINVAL: 'Invalid argument',
  [ErrorCodes.INVALID_ARGUMENT]: 'Invalid argument',
  EPERM: 'Operation not permitted',
  EACCES: 'Permission denied',
  EROFS: 'Read-only file system',
  [ErrorCodes.READ_ONLY]: 'Permission denied',
  EFBIG: 'File too large',
  ENOMEM: 'Cannot allocate memory',
  EBADF: 'Bad file descriptor',
  ENOENT: 'No such file or directory',
  EISDIR: 'Is a directory',
  ENOTDIR: 'Not a directory',
  EAGAIN: 'Resource temporarily unavailable',
  EBUSY: 'Device or resource busy',
  EDQUOT: 'Disk quota exceeded',
};

/** The strerror text qemu would print for a failed request. */
export function errorText(error: unknown): string {
  const code = (error as { code?: unknown })?.code;
  return (typeof code === 'string' && ERRNO_TEXT[code]) || 'Input/output error';
}

/**
 * The line qcow2 prints on stderr when a failure marks the image corrupt ("qcow2: Marking image as
 * corrupt: …; further corruption events will be suppressed"); undefined for other failures and for
 * the later ones, which report the corruption already marked.
 */
export function corruptionNotice(error: unknown): string | undefined {
  const { code, message } = (error ?? {}) as { code?: unknown; message?: unknown };
  if (code !== ErrorCodes.CORRUPT || typeof message !== 'string' || !message.startsWith('Marking image as corrupt: ')) return undefined;
  // qcow2 names the structure; where the write was aimed is ours to add (the error message keeps it).
  const what = /^Marking image as corrupt: Preventing invalid write on metadata \(overlaps with [^)]*\)/.exec(message)?.[0] ?? message;
  return `qcow2: ${what}; further corruption events will be suppressed\n`;
}
