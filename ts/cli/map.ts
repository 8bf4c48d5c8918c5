/** `qcow2 map [-f FMT] [--output=human|json] [--start-offset N] [--max-length N] [-U] IMG`: qemu-img map's output. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import { MapBits, MapTable, mapRange, mapTables } from '../tools/map.js';
import { UsageError, lastOption, parseArgs } from './args.js';
import { expectOperands, openImage, optionValue, parseFormat, parseSizeOption } from './common.js';

const SPEC = {
  short: 'f:hU',
  long: {
    output: { value: true },
    'start-offset': { value: true },
    'max-length': { value: true },
    'force-share': { value: false, key: 'U' },
    help: { value: false, key: 'h' },
  },
};

const USAGE = 'usage: qcow2 map [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename\n';

/** Bytes of output gathered before one write to stdout. */
const CHUNK = 1 << 20;
/** Room kept free in a chunk for one more line (a path is at most 4096 bytes on Linux). */
const LINE_ROOM = 16384;

/**
 * Output written straight into big Buffers: the map prints one line per entry, and hundreds of
 * thousands of entries made into strings cost more than mapping the image.
 */
class ByteWriter {
  buf = Buffer.allocUnsafe(CHUNK);
  pos = 0;

  /** Append ASCII `text`. */
  text(text: string): void {
    for (let i = 0; i < text.length; i++) this.buf[this.pos++] = text.charCodeAt(i);
  }

  /** Append `text` in UTF-8 (file names). */
  utf8(text: string): void {
    this.pos += this.buf.write(text, this.pos, 'utf8');
  }

  /** Append `bytes` (short constants: a loop beats TypedArray.set for a few bytes). */
  bytes(bytes: Uint8Array): void {
    const buf = this.buf;
    let pos = this.pos;
    for (let i = 0; i < bytes.length; i++) buf[pos++] = bytes[i];
    this.pos = pos;
  }

  /**
   * Append a safe non-negative integer in decimal. Split at 10^8 so that every step is small-integer
   * arithmetic, which V8 runs much faster than division of doubles (offsets pass 2^31 often).
   */
  decimal(value: number): void {
    if (value < DECIMAL_SPLIT) {
      this.smallDecimal(value);
      return;
    }
    const high = Math.floor(value / DECIMAL_SPLIT);
    this.smallDecimal(high);
    let low = value - high * DECIMAL_SPLIT;
    const buf = this.buf;
    const end = this.pos + 8;
    for (let at = end - 1; at >= this.pos; at--) {
      const rest = (low / 10) | 0;
      buf[at] = 0x30 + low - rest * 10;
      low = rest;
    }
    this.pos = end;
  }

  /** Append a non-negative integer below 10^8 in decimal. */
  smallDecimal(value: number): void {
    let count = 1;
    for (let limit = 10; limit <= value; limit *= 10) count++;
    const buf = this.buf;
    let at = this.pos + count;
    this.pos = at;
    do {
      const rest = (value / 10) | 0;
      buf[--at] = 0x30 + value - rest * 10;
      value = rest;
    } while (value > 0);
  }

  /** Append C's "%#x" of a safe non-negative integer: hexadecimal with 0x, except that zero is plain "0". */
  hex(value: number): void {
    if (value !== 0) this.text('0x');
    this.digits(value, 16);
  }

  /** Append spaces up to column `width` of the text written since `from` (an earlier `pos`). */
  padFrom(from: number, width: number): void {
    while (this.pos - from < width) this.buf[this.pos++] = 0x20;
  }

  /** Append `value` in `base` (10 or 16). */
  digits(value: number, base: number): void {
    let count = 1;
    for (let limit = base; limit <= value; limit *= base) count++;
    const buf = this.buf;
    let at = this.pos + count;
    this.pos = at;
    do {
      const rest = Math.floor(value / base);
      buf[--at] = HEX_DIGITS[value - rest * base];
      value = rest;
    } while (value > 0);
  }

  /** The chunk is nearly full: flush() before the next line. */
  get full(): boolean {
    return this.pos >= CHUNK - LINE_ROOM;
  }

  /** Write what was gathered. */
  async flush(): Promise<void> {
    if (this.pos === 0) return;
    const chunk = this.buf.subarray(0, this.pos);
    this.buf = Buffer.allocUnsafe(CHUNK);
    this.pos = 0;
    if (!process.stdout.write(chunk)) await new Promise<void>((resolve) => process.stdout.once('drain', resolve));
  }
}

/** decimal() writes the digits below and above this power of ten separately. */
const DECIMAL_SPLIT = 100_000_000;

const HEX_DIGITS = new Uint8Array(Buffer.from('0123456789abcdef', 'latin1'));

/** The middle of a JSON line for each combination of present / zero / data. */
const JSON_FLAGS = Array.from({ length: 8 }, (_, bits) =>
  Buffer.from(
    `, "present": ${(bits & MapBits.Present) !== 0}, "zero": ${(bits & MapBits.Zero) !== 0}, "data": ${(bits & MapBits.Data) !== 0}`,
    'latin1',
  ),
);
const JSON_START = Buffer.from('{ "start": ', 'latin1');
const JSON_LENGTH = Buffer.from(', "length": ', 'latin1');
const JSON_DEPTH = Buffer.from(', "depth": ', 'latin1');
const JSON_OFFSET = Buffer.from(', "offset": ', 'latin1');
const JSON_SEPARATOR = Buffer.from(',\n', 'latin1');

/** One line of the JSON list, without the separator. */
function jsonLine(out: ByteWriter, start: number, length: number, depth: number, bits: number, offset: number): void {
  out.bytes(JSON_START);
  out.decimal(start);
  out.bytes(JSON_LENGTH);
  out.decimal(length);
  out.bytes(JSON_DEPTH);
  out.decimal(depth);
  out.bytes(JSON_FLAGS[bits & 7]);
  if (offset >= 0) {
    out.bytes(JSON_OFFSET);
    out.decimal(offset);
  }
  out.buf[out.pos++] = 0x7d; // }
}

/** Row `i` of `table` as a line of the human table; holes and zeroes have none. */
function humanLine(out: ByteWriter, table: MapTable, i: number): void {
  const bits = table.bits[i];
  if (bits & MapBits.Data && table.offset[i] < 0) {
    throw new Qcow2Error(ErrorCodes.UNSUPPORTED, 'File contains external, encrypted or compressed clusters.');
  }
  if (!(bits & MapBits.Data) || bits & MapBits.Zero) return;
  let from = out.pos;
  out.hex(table.start[i]);
  out.padFrom(from, 16);
  from = out.pos;
  out.hex(table.length[i]);
  out.padFrom(from, 16);
  from = out.pos;
  out.hex(table.offset[i]);
  out.padFrom(from, 16);
  out.utf8(`${table.file[i]}\n`);
}

/** Run `qcow2 map` with `argv` (the arguments after "map"); resolves to the exit code. */
export async function run(argv: string[]): Promise<number> {
  const args = parseArgs(argv, SPEC);
  if (args.options.has('h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  const output = lastOption(args, 'output') ?? 'human';
  if (output !== 'human' && output !== 'json') {
    throw new UsageError('--output must be used with human or json as argument.');
  }
  const start = optionValue(args, 'start-offset', (t) => parseSizeOption(t, 'start offset')) ?? 0;
  const maxLength = optionValue(args, 'max-length', (t) => parseSizeOption(t, 'max length'));
  const [file] = expectOperands(args, 1);
  const image = await openImage(file, { format: parseFormat(lastOption(args, 'f')) });
  const out = new ByteWriter();
  try {
    if (output === 'json') await printJson(image, out, start, maxLength);
    else await printHuman(image, out, start, maxLength);
    return 0;
  } finally {
    await out.flush();
    await image.close();
  }
}

type Opened = Awaited<ReturnType<typeof openImage>>;

async function printJson(image: Opened, out: ByteWriter, start: number, maxLength?: number): Promise<void> {
  let first = true;
  for await (const table of mapTables(image, { start, maxLength })) {
    for (let i = 0; i < table.count; i++) {
      if (first) out.text('[');
      else out.bytes(JSON_SEPARATOR);
      first = false;
      jsonLine(out, table.start[i], table.length[i], table.depth[i], table.bits[i], table.offset[i]);
      if (out.full) await out.flush();
    }
  }
  if (first) {
    // qemu-img prints the empty run it starts from when there is nothing to map.
    const { start: at } = mapRange(image, { start, maxLength });
    out.text('[');
    jsonLine(out, at, 0, 0, 0, -1);
  }
  out.text(']\n');
}

async function printHuman(image: Opened, out: ByteWriter, start: number, maxLength?: number): Promise<void> {
  out.text(`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`);
  for await (const table of mapTables(image, { start, maxLength })) {
    for (let i = 0; i < table.count; i++) {
      humanLine(out, table, i);
      if (out.full) await out.flush();
    }
  }
}
