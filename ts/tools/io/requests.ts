/** The data commands of qemu-io: read, write, readv, writev, aio_read, aio_write, discard. */
import { readFile } from 'node:fs/promises';

import { ErrorCodes, Qcow2Error } from '../../errors.js';
import type { Image } from '../../image.js';
import { allocAligned } from '../../native.js';
import { MAX_REQUEST_BYTES, ParseError, dumpBuffer, errorText, parseLength, parseNumber, parsePattern, report } from './format.js';
import { IoSession, ShowUsage } from './session.js';

/** The fill byte of writes without -P: 0xcd, as in qemu-io. */
export const DEFAULT_WRITE_PATTERN = 0xcd;

/** Parsed options of one command: flags by letter, values by letter. */
export type Flags = Map<string, string[]>;

/** A buffer of `length` bytes aligned for O_DIRECT (an empty one needs no alignment). */
function alignedBuffer(length: number): Buffer {
  return length === 0 ? Buffer.alloc(0) : allocAligned(length);
}

/**
 * Seconds spent running `request` on [offset, offset + length) of `image`. A range past the end
 * fails as in qemu, with EIO, before the Image API sees it (offsets past 2^53 included).
 */
async function timed(image: Image, offset: number, length: number, request: () => Promise<void>): Promise<number> {
  if (offset + length > image.size) {
    throw new Qcow2Error(ErrorCodes.OUT_OF_BOUNDS, `request ${offset}+${length} is past the end of the disk (${image.size} bytes)`);
  }
  const start = process.hrtime.bigint();
  await request();
  return Number(process.hrtime.bigint() - start) / 1e9;
}

/** Check that `length` bytes of `buffer` from `start` all hold `pattern`; say where it failed, as qemu-io does. */
function verifyPattern(s: IoSession, buffer: Uint8Array, pattern: number, offset: number, start: number, length: number): boolean {
  for (let i = start; i < start + length; i++) {
    if (buffer[i] !== pattern) {
      s.out(`Pattern verification failed at offset ${offset + start}, ${length} bytes\n`);
      return false;
    }
  }
  return true;
}

/** The pattern of -P, if given. */
function patternOption(flags: Flags): number | undefined {
  const text = flags.get('P')?.at(-1);
  return text === undefined ? undefined : parsePattern(text);
}

/** Parse operands "off len [len..]" of the vectored commands; each length is bounded like qemu's. */
function vectorOperands(operands: string[]): { offset: number; lengths: number[] } {
  const offset = parseNumber(operands[0]);
  const lengths = operands.slice(1).map((text) => {
    const value = parseNumber(text);
    if (value > MAX_REQUEST_BYTES) throw new ParseError(`Argument '${text}' exceeds maximum size ${MAX_REQUEST_BYTES}`);
    return value;
  });
  return { offset, lengths };
}

/** Print what a finished read shows: -v dump, then statistics (unless -q). */
function finishRead(s: IoSession, flags: Flags, buffer: Buffer, offset: number, seconds: number): void {
  if (flags.has('q')) return;
  if (flags.has('v')) s.out(dumpBuffer(buffer, offset));
  s.out(report('read', offset, buffer.length, 1, seconds, flags.has('C')));
}

/** `read [-bCqv] [-P pattern [-s off] [-l len]] off len`. */
export async function readCommand(s: IoSession, flags: Flags, operands: string[]): Promise<boolean> {
  const pattern = patternOption(flags);
  const startText = flags.get('s')?.at(-1);
  const lengthText = flags.get('l')?.at(-1);
  const start = startText === undefined ? 0 : parseNumber(startText);
  const verifyLength = lengthText === undefined ? undefined : parseNumber(lengthText);
  const offset = parseNumber(operands[0]);
  const length = parseLength(operands[1]);
  if (pattern === undefined && (startText !== undefined || lengthText !== undefined)) throw new ShowUsage();
  const checked = verifyLength ?? length - start;
  if (checked < 0 || start + checked > length) {
    s.out('pattern verification range exceeds end of read data\n');
    return false;
  }
  if (flags.has('b')) return vmStateFailure(s, 'read', offset, length);
  const buffer = alignedBuffer(length);
  let seconds: number;
  try {
    seconds = await timed(s.image!, offset, buffer.length, () => s.image!.read(buffer, offset));
  } catch (error) {
    s.failed('read', error);
    return false;
  }
  const ok = pattern === undefined || verifyPattern(s, buffer, pattern, offset, start, checked);
  finishRead(s, flags, buffer, offset, seconds);
  return ok;
}

/** qemu-io's checks of -b and -c requests: whole sectors only. */
function sectorAligned(s: IoSession, offset: number, length: number): boolean {
  if (offset % 512 !== 0) {
    s.out(`${offset} is not a sector-aligned value for 'offset'\n`);
    return false;
  }
  if (length % 512 !== 0) {
    s.out(`${length} is not a sector-aligned value for 'count'\n`);
    return false;
  }
  return true;
}

/** The VM state area (-b) is not part of the Image interface: refused like a driver without one. */
function vmStateFailure(s: IoSession, what: string, offset: number, length: number): boolean {
  if (sectorAligned(s, offset, length)) s.out(`${what} failed: Operation not supported\n`);
  return false;
}

/** A buffer of `length` bytes repeating the contents of `path`, or undefined after saying why not. */
async function fileFilledBuffer(s: IoSession, path: string, length: number): Promise<Buffer | undefined> {
  let contents: Buffer;
  try {
    contents = await readFile(path);
  } catch (error) {
    s.err(`${path}: ${errorText(error)}\n`);
    return undefined;
  }
  if (contents.length === 0) {
    s.err(`${path}: file is empty\n`);
    return undefined;
  }
  const buffer = alignedBuffer(length);
  for (let pos = 0; pos < length; pos += contents.length) contents.copy(buffer, pos, 0, Math.min(contents.length, length - pos));
  return buffer;
}

/** A compressed write, where the image offers one (qcow2 images do; raw images do not). */
type CompressedWriter = { writeCompressed(buffer: Uint8Array, offset: number): Promise<void> };

function compressedWriter(image: unknown): CompressedWriter | undefined {
  const candidate = image as Partial<CompressedWriter>;
  return typeof candidate.writeCompressed === 'function' ? (candidate as CompressedWriter) : undefined;
}

/** `write [-bcCfnquz] [-P pattern | -s source_file] off len`. */
export async function writeCommand(s: IoSession, flags: Flags, operands: string[]): Promise<boolean> {
  const zero = flags.has('z');
  if (flags.has('b') && zero) return fail(s, '-b and -z cannot be specified at the same time');
  if (Number(zero) + Number(flags.has('P')) + Number(flags.has('s')) > 1) {
    return fail(s, 'Only one of -z, -P, and -s can be specified at the same time');
  }
  if (flags.has('u') && !zero) return fail(s, '-u requires -z to be specified');
  if (flags.has('n') && !zero) return fail(s, '-n requires -z to be specified');
  const pattern = patternOption(flags) ?? DEFAULT_WRITE_PATTERN;
  const offset = parseNumber(operands[0]);
  const length = parseLength(operands[1]);
  if ((flags.has('b') || flags.has('c')) && !sectorAligned(s, offset, length)) return false;
  if (flags.has('b')) return vmStateFailure(s, 'write', offset, length);
  const image = s.image!;
  let request: () => Promise<void>;
  if (zero) {
    request = () => image.writeZeroes(offset, length, { unmap: flags.has('u') });
  } else {
    const source = flags.get('s')?.at(-1);
    const buffer = source === undefined ? alignedBuffer(length).fill(pattern) : await fileFilledBuffer(s, source, length);
    if (!buffer) return false;
    const compressed = flags.has('c') ? compressedWriter(image) : undefined;
    if (flags.has('c') && !compressed) return fail(s, 'write failed: Operation not supported');
    request = compressed ? () => compressed.writeCompressed(buffer, offset) : () => image.write(buffer, offset);
  }
  return runWrite(s, flags, image, offset, length, request, 'write');
}

/** Time `request` (then a flush with -f) and print qemu-io's "wrote" lines, or `NAME failed: …`. */
async function runWrite(s: IoSession, flags: Flags, image: Image, offset: number, length: number, request: () => Promise<void>, name: string): Promise<boolean> {
  let seconds: number;
  try {
    seconds = await timed(image, offset, length, async () => {
      await request();
      if (flags.has('f')) await image.flush();
    });
  } catch (error) {
    s.failed(name, error);
    return false;
  }
  if (!flags.has('q')) s.out(report('wrote', offset, length, 1, seconds, flags.has('C')));
  return true;
}

/** Print `message` on stdout and fail, as qemu-io's argument checks do. */
function fail(s: IoSession, message: string): false {
  s.out(`${message}\n`);
  return false;
}

/** `readv [-Cqv] [-P pattern] off len [len..]`: one request into several buffers. */
export async function readvCommand(s: IoSession, flags: Flags, operands: string[]): Promise<boolean> {
  const pattern = patternOption(flags);
  const { offset, lengths } = vectorOperands(operands);
  const buffer = alignedBuffer(lengths.reduce((a, b) => a + b, 0));
  let seconds: number;
  try {
    seconds = await timed(s.image!, offset, buffer.length, () => s.image!.read(buffer, offset));
  } catch (error) {
    s.failed('readv', error);
    return false;
  }
  const ok = pattern === undefined || verifyPattern(s, buffer, pattern, offset, 0, buffer.length);
  finishRead(s, flags, buffer, offset, seconds);
  return ok;
}

/** `writev [-Cfq] [-P pattern] off len [len..]`. */
export async function writevCommand(s: IoSession, flags: Flags, operands: string[]): Promise<boolean> {
  const pattern = patternOption(flags) ?? DEFAULT_WRITE_PATTERN;
  const { offset, lengths } = vectorOperands(operands);
  const buffer = alignedBuffer(lengths.reduce((a, b) => a + b, 0)).fill(pattern);
  const image = s.image!;
  let seconds: number;
  try {
    seconds = await timed(image, offset, buffer.length, async () => {
      await image.write(buffer, offset);
      if (flags.has('f')) await image.flush();
    });
  } catch (error) {
    s.failed('writev', error);
    return false;
  }
  if (!flags.has('q')) s.out(report('wrote', offset, buffer.length, 1, seconds, flags.has('C')));
  return true;
}

/** `aio_read [-Ciqv] [-P pattern] off len [len..]`: started now, reported when it completes. */
export async function aioReadCommand(s: IoSession, flags: Flags, operands: string[]): Promise<boolean> {
  const pattern = patternOption(flags);
  const { offset, lengths } = vectorOperands(operands);
  if (flags.has('i')) return true;
  const buffer = alignedBuffer(lengths.reduce((a, b) => a + b, 0));
  const image = s.image!;
  s.track(
    (async () => {
      let seconds: number;
      try {
        seconds = await timed(image, offset, buffer.length, () => image.read(buffer, offset));
      } catch (error) {
        s.failed('readv', error);
        return;
      }
      if (pattern !== undefined) verifyPattern(s, buffer, pattern, offset, 0, buffer.length);
      finishRead(s, flags, buffer, offset, seconds);
    })(),
  );
  return true;
}

/** `aio_write [-Cfiquz] [-P pattern] off len [len..]`. */
export async function aioWriteCommand(s: IoSession, flags: Flags, operands: string[]): Promise<boolean> {
  const zero = flags.has('z');
  if (flags.has('u') && !zero) return fail(s, '-u requires -z to be specified');
  const pattern = patternOption(flags) ?? DEFAULT_WRITE_PATTERN;
  const { offset, lengths } = vectorOperands(operands);
  if (zero && lengths.length > 1) return fail(s, '-z supports only a single length parameter');
  if (flags.has('i')) return true;
  const length = lengths.reduce((a, b) => a + b, 0);
  const image = s.image!;
  const request = zero
    ? () => image.writeZeroes(offset, length, { unmap: flags.has('u') })
    : () => image.write(alignedBuffer(length).fill(pattern), offset);
  s.track(runWrite(s, flags, image, offset, length, request, 'aio_write').then(() => undefined));
  return true;
}

/** `discard [-Cq] off len`. */
export async function discardCommand(s: IoSession, flags: Flags, operands: string[]): Promise<boolean> {
  const offset = parseNumber(operands[0]);
  const length = parseLength(operands[1]);
  let seconds: number;
  try {
    seconds = await timed(s.image!, offset, length, () => s.image!.discard(offset, length));
  } catch (error) {
    s.failed('discard', error);
    return false;
  }
  if (!flags.has('q')) s.out(report('discard', offset, length, 1, seconds, flags.has('C')));
  return true;
}
