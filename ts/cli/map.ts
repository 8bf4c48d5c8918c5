/** `qcow2 map [-f FMT] [--output=human|json] [--start-offset N] [--max-length N] [-U] IMG`: qemu-img map's output. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import { native } from '../native.js';
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

  /** Bytes left in the chunk. */
  get room(): number {
    return this.buf.length - this.pos;
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

const HEX_DIGITS = new Uint8Array(Buffer.from('0123456789abcdef', 'latin1'));

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

/** The JSON list: lines formatted by the addon straight from the map tables. */
async function printJson(image: Opened, out: ByteWriter, start: number, maxLength?: number): Promise<void> {
  let first = true;
  out.text('[');
  const write = async (table: MapTable) => {
    if (out.room < table.count * native.mapJsonLineMax) await out.flush();
    const { start: s, length, depth, bits, offset, count } = table;
    out.pos = native.formatMapJson(s, length, depth, bits, offset, count, out.buf, out.pos, first);
    first = false;
  };
  for await (const table of mapTables(image, { start, maxLength })) await write(table);
  if (first) {
    // qemu-img prints the empty run it starts from when there is nothing to map.
    const empty = new MapTable();
    empty.count = 1;
    empty.start[0] = mapRange(image, { start, maxLength }).start;
    empty.offset[0] = -1;
    await write(empty);
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
