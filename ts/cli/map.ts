/** `qcow2 map [-f FMT] [--output=human|json] [--start-offset N] [--max-length N] [-U] IMG`: qemu-img map's output. */
import { ErrorCodes, Qcow2Error } from '../errors.js';
import { MapEntry, mapImage, mapRange } from '../tools/map.js';
import { UsageError, lastOption, parseArgs } from './args.js';
import { OutputBuffer, expectOperands, openImage, optionValue, parseFormat, parseSizeOption } from './common.js';

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

/** C's "%#x": hexadecimal with 0x, except that zero is plain "0". */
function hex(value: number): string {
  return value === 0 ? '0' : `0x${value.toString(16)}`;
}

/** One line of the JSON list, without the separator. */
function jsonLine(e: Pick<MapEntry, 'start' | 'length' | 'depth' | 'present' | 'zero' | 'data' | 'offset'>): string {
  const offset = e.offset === undefined ? '' : `, "offset": ${e.offset}`;
  return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${offset}}`;
}

/** One line of the human table, or '' for runs the table leaves out (holes and zeroes). */
function humanLine(e: MapEntry): string {
  if (e.data && e.offset === undefined) {
    throw new Qcow2Error(ErrorCodes.UNSUPPORTED, 'File contains external, encrypted or compressed clusters.');
  }
  if (!e.data || e.zero) return '';
  const cell = (text: string) => text.padEnd(16);
  return `${cell(hex(e.start))}${cell(hex(e.length))}${cell(hex(e.offset!))}${e.file}\n`;
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
  const out = new OutputBuffer();
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

async function printJson(image: Opened, out: OutputBuffer, start: number, maxLength?: number): Promise<void> {
  let first = true;
  for await (const batch of mapImage(image, { start, maxLength })) {
    const lines = batch.map(jsonLine).join(',\n');
    await out.push(first ? `[${lines}` : `,\n${lines}`);
    first = false;
  }
  if (first) {
    // qemu-img prints the empty run it starts from when there is nothing to map.
    const { start: at } = mapRange(image, { start, maxLength });
    await out.push(`[${jsonLine({ start: at, length: 0, depth: 0, present: false, zero: false, data: false })}`);
  }
  await out.push(']\n');
}

async function printHuman(image: Opened, out: OutputBuffer, start: number, maxLength?: number): Promise<void> {
  await out.push(`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`);
  for await (const batch of mapImage(image, { start, maxLength })) {
    for (const entry of batch) {
      const line = humanLine(entry);
      if (line) await out.push(line);
    }
  }
}
