/** qemu-io's command table and the loop that runs one command line. */
import { ErrorCodes, Qcow2Error } from '../../errors.js';
import type { Image, ImageFormat } from '../../image.js';
import { CACHE_MODES, CacheMode } from '../../native.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { UsageError, parseArgs } from '../../cli/args.js';
import { QemuJsonValue, dumpNested } from '../../cli/qemu-format.js';
import { info } from '../info.js';
import type { Preallocation } from '../create.js';
import { resizeImage } from '../resize.js';
import { RawImage } from '../../raw.js';
import { ProbedRawImage } from './probe-guard.js';
import { ParseError, cvtstr, parseNumber } from './format.js';
import {
  Flags,
  aioReadCommand,
  aioWriteCommand,
  discardCommand,
  readCommand,
  readvCommand,
  writeCommand,
  writevCommand,
} from './requests.js';
import { IO_DEFAULT_CACHE, IoOpenRequest, IoSession, ShowUsage } from './session.js';

/** One qemu-io command: its syntax, its argument bounds and what it does. */
interface Command {
  name: string;
  /** The one-letter (or symbol) alias qemu-io also accepts. */
  alt?: string;
  /** Operand syntax; left out for commands without any (map has an empty one, and so prints two spaces). */
  args?: string;
  oneline: string;
  help?: string;
  /** getopt option letters; undefined when the command takes no options. */
  options?: string;
  min: number;
  /** -1: no upper bound. */
  max: number;
  /** Runs without an open image. */
  noFile?: boolean;
  /** Needs write access to the image. */
  writes?: boolean;
  run(s: IoSession, flags: Flags, operands: string[]): Promise<boolean>;
}

/** The outcome of one command line. */
export interface LineResult {
  ok: boolean;
  quit: boolean;
}

const COMMANDS: Command[] = [
  {
    name: 'aio_flush',
    oneline: 'completes all outstanding aio requests',
    min: 0,
    max: 0,
    run: async (s) => {
      await s.drain();
      return true;
    },
  },
  {
    name: 'aio_read',
    args: '[-Ciqv] [-P pattern] off len [len..]',
    oneline: 'asynchronously reads a number of bytes',
    help: 'Starts a read and returns at once; the result is printed when the read completes.\nUse aio_flush to wait for every started request.\n',
    options: 'CiP:qv',
    min: 2,
    max: -1,
    run: aioReadCommand,
  },
  {
    name: 'aio_write',
    args: '[-Cfiquz] [-P pattern] off len [len..]',
    oneline: 'asynchronously writes a number of bytes',
    help: 'Starts a write of pattern bytes (default 0xcd) and returns at once; the result is\nprinted when the write completes. Use aio_flush to wait for every started request.\n',
    options: 'CfiP:quz',
    min: 2,
    max: -1,
    writes: true,
    run: aioWriteCommand,
  },
  {
    name: 'alloc',
    alt: 'a',
    args: 'offset [count]',
    oneline: 'checks if offset is allocated in the file',
    min: 1,
    max: 2,
    run: allocCommand,
  },
  { name: 'close', alt: 'c', oneline: 'close the current open file', min: 0, max: 0, run: closeCommand },
  {
    name: 'discard',
    alt: 'd',
    args: '[-Cq] off len',
    oneline: 'discards a number of bytes at a specified offset',
    help: 'Tells the image that the bytes in the range are no longer needed.\n -C, -- print statistics as one comma-separated line\n -q, -- print no statistics\n',
    options: 'Cq',
    min: 2,
    max: -1,
    writes: true,
    run: withOperands(2, discardCommand),
  },
  {
    name: 'flush',
    alt: 'f',
    oneline: 'flush all in-core file state to disk',
    min: 0,
    max: 0,
    run: async (s) => {
      try {
        await s.image!.flush();
        return true;
      } catch {
        return false;
      }
    },
  },
  { name: 'help', alt: '?', args: '[command]', oneline: 'help for one or all commands', min: 0, max: 1, noFile: true, run: helpCommand },
  { name: 'info', alt: 'i', oneline: 'prints information about the current file', min: 0, max: 0, run: infoCommand },
  {
    name: 'length',
    alt: 'l',
    oneline: 'gets the length of the current file',
    min: 0,
    max: 0,
    run: async (s) => {
      s.out(`${cvtstr(s.image!.size)}\n`);
      return true;
    },
  },
  { name: 'map', args: '', oneline: 'prints the allocated areas of a file', min: 0, max: 0, run: mapCommand },
  {
    name: 'open',
    alt: 'o',
    args: '[-rsCnkU] [-t cache] [-d discard] [-o options] [path]',
    oneline: 'open the file specified by path',
    help:
      'Opens an image for the commands that follow.\n -r, -- open read-only\n -n, -- no host cache, the same as -t none\n' +
      ' -t, -- host cache mode (none, writeback, unsafe, directsync, writethrough)\n' +
      ' -o, -- driver=raw or driver=qcow2 to name the format\n -C, -k, -U, -i, -d -- accepted for compatibility\n',
    options: 'rsCnkUt:d:o:i:',
    min: 1,
    max: -1,
    noFile: true,
    run: openCommand,
  },
  {
    name: 'reopen',
    args: '[(-r|-w)] [-c cache] [-o options]',
    oneline: 'reopens an image with new options',
    help: 'Opens the image again, read-only (-r) or read-write (-w), with another host cache mode (-c).\n',
    options: 'rwc:o:',
    min: 0,
    max: -1,
    run: reopenCommand,
  },
  { name: 'quit', alt: 'q', oneline: 'exit the program', min: 0, max: 0, noFile: true, run: async () => true },
  {
    name: 'read',
    alt: 'r',
    args: '[-abCqv] [-P pattern [-s off] [-l len]] off len',
    oneline: 'reads a number of bytes at a specified offset',
    help:
      'Reads guest bytes; with -P checks that each holds the pattern byte (only from -s for -l bytes).\n' +
      ' -b, -- the VM state area instead of the disk\n -C, -- print statistics as one comma-separated line\n' +
      ' -q, -- print no statistics\n -v, -- dump the bytes in hex\n',
    options: 'bCl:pP:qs:v',
    min: 2,
    max: -1,
    run: withOperands(2, readCommand),
  },
  {
    name: 'readv',
    args: '[-Cqv] [-P pattern] off len [len..]',
    oneline: 'reads a number of bytes at a specified offset',
    help: 'Reads guest bytes into one buffer per length given.\n',
    options: 'CP:qv',
    min: 2,
    max: -1,
    run: atLeastOperands(2, readvCommand),
  },
  {
    name: 'sleep',
    oneline: 'waits for the given value in milliseconds',
    min: 1,
    max: 1,
    noFile: true,
    run: sleepCommand,
  },
  {
    name: 'truncate',
    alt: 't',
    args: '[-m prealloc_mode] off',
    oneline: 'truncates the current file at the given offset',
    options: 'm:',
    min: 1,
    max: 3,
    writes: true,
    run: withOperands(1, truncateCommand),
  },
  {
    name: 'write',
    alt: 'w',
    args: '[-bcCfnquz] [-P pattern | -s source_file] off len',
    oneline: 'writes a number of bytes at a specified offset',
    help:
      'Writes pattern bytes (default 0xcd), the repeated contents of a file (-s), or zeroes (-z).\n' +
      ' -c, -- compressed\n -f, -- flush the data before returning\n -u, -- with -z, the space may be freed\n' +
      ' -n, -- with -z, accepted for compatibility\n -C, -- print statistics as one comma-separated line\n -q, -- print no statistics\n',
    options: 'bcCfnpP:qs:uz',
    min: 2,
    max: -1,
    writes: true,
    run: withOperands(2, writeCommand),
  },
  {
    name: 'writev',
    args: '[-Cfq] [-P pattern] off len [len..]',
    oneline: 'writes a number of bytes at a specified offset',
    help: 'Writes pattern bytes (default 0xcd) from one buffer per length given.\n',
    options: 'CfqP:',
    min: 2,
    max: -1,
    writes: true,
    run: atLeastOperands(2, writevCommand),
  },
];

/** Run `run` only when exactly `count` operands are left after the options. */
function withOperands(count: number, run: Command['run']): Command['run'] {
  return (s, flags, operands) => {
    if (operands.length !== count) throw new ShowUsage();
    return run(s, flags, operands);
  };
}

/** Run `run` only when at least `count` operands are left after the options. */
function atLeastOperands(count: number, run: Command['run']): Command['run'] {
  return (s, flags, operands) => {
    if (operands.length < count) throw new ShowUsage();
    return run(s, flags, operands);
  };
}

function find(name: string): Command | undefined {
  return COMMANDS.find((c) => c.name === name || c.alt === name);
}

function usageLine(command: Command): string {
  return `${command.name}${command.args === undefined ? '' : ` ${command.args}`} -- ${command.oneline}\n`;
}

function countError(command: Command, typed: string, count: number): string | undefined {
  if (count >= command.min && (command.max < 0 || count <= command.max)) return undefined;
  const expected =
    command.max < 0
      ? `at least ${command.min} arguments`
      : command.min === command.max
        ? `${command.min} arguments`
        : `between ${command.min} and ${command.max} arguments`;
  return `bad argument count ${count} to ${typed}, expected ${expected}\n`;
}

/** Run one command line; failures are printed, never thrown. */
export async function executeLine(s: IoSession, line: string): Promise<LineResult> {
  // Words are separated by spaces only, as in qemu-io: a tab is part of a word.
  const [typed, ...args] = line.split(' ').filter((word) => word !== '');
  if (typed === undefined) return { ok: true, quit: false };
  const command = find(typed);
  if (!command) {
    s.err(`command "${typed}" not found\n`);
    return { ok: false, quit: false };
  }
  if (!command.noFile && !s.image) {
    s.err("no file open, try 'help open'\n");
    return { ok: false, quit: false };
  }
  const badCount = countError(command, typed, args.length);
  if (badCount) {
    s.err(badCount);
    return { ok: false, quit: false };
  }
  if (command.name === 'quit') return { ok: true, quit: true };
  if (command.writes && s.image?.readOnly) {
    s.error('Block node is read-only');
    return { ok: false, quit: false };
  }
  return { ok: await runCommand(s, command, args), quit: false };
}

async function runCommand(s: IoSession, command: Command, args: string[]): Promise<boolean> {
  let flags: Flags = new Map();
  let operands = args;
  if (command.options !== undefined) {
    try {
      ({ options: flags, positional: operands } = parseArgs(args, { short: command.options }));
    } catch (error) {
      if (!(error instanceof UsageError)) throw error;
      s.err(`${command.name}: ${error.message}\n`);
      s.out(usageLine(command));
      return false;
    }
  }
  try {
    return await command.run(s, flags, operands);
  } catch (error) {
    if (error instanceof ShowUsage) {
      s.out(usageLine(command));
      return false;
    }
    if (error instanceof ParseError) {
      s.out(`${error.message}\n`);
      return false;
    }
    // A failure no command expected (a corrupt table met by map, say): reported, and the session goes on.
    s.error((error as Error).message);
    return false;
  }
}

/** True when the image itself (not a backing file) holds the run. */
function allocatedHere(kind: string, depth: number): boolean {
  return depth === 0 && kind !== 'unallocated';
}

/** `alloc offset [count]`: how many of `count` bytes (default 512) from `offset` the image itself holds. */
async function allocCommand(s: IoSession, _flags: Flags, operands: string[]): Promise<boolean> {
  const image = s.image!;
  const offset = parseNumber(operands[0]);
  const asked = operands.length > 1 ? parseNumber(operands[1]) : 512;
  const count = Math.max(0, Math.min(asked, image.size - offset));
  let allocated = 0;
  if (count > 0) {
    for await (const extent of image.extents({ offset, length: count })) {
      if (allocatedHere(extent.kind, extent.depth)) allocated += extent.length;
    }
  }
  s.out(`${allocated}/${count} bytes allocated at offset ${cvtstr(offset)}\n`);
  return true;
}

/** `map`: runs the image itself holds and runs it leaves to its backing file, merged. */
async function mapCommand(s: IoSession): Promise<boolean> {
  const image = s.image!;
  let run: { offset: number; length: number; allocated: boolean } | undefined;
  const print = (r: NonNullable<typeof run>) =>
    s.out(
      `${cvtstr(r.length)} (0x${r.length.toString(16)}) bytes ${r.allocated ? '    allocated' : 'not allocated'} ` +
        `at offset ${cvtstr(r.offset)} (0x${r.offset.toString(16)})\n`,
    );
  for await (const extent of image.extents()) {
    const allocated = allocatedHere(extent.kind, extent.depth);
    if (run && run.allocated === allocated) {
      run.length += extent.length;
      continue;
    }
    if (run) print(run);
    run = { offset: extent.offset, length: extent.length, allocated };
  }
  if (run) print(run);
  return true;
}

/** Where qemu puts a qcow2 image's VM state: after the guest disk, rounded up to what one L1 entry maps. */
function vmStateOffset(image: Qcow2Image): number {
  const { clusterSize, extendedL2, size } = image.header;
  const perL1Entry = clusterSize * (clusterSize / (extendedL2 ? 16 : 8));
  return Math.ceil(size / perL1Entry) * perL1Entry;
}

/** `info`: format, cluster size, VM state offset, and the format-specific block qemu-img info shows too. */
async function infoCommand(s: IoSession): Promise<boolean> {
  const image = s.image!;
  const qcow2 = image instanceof Qcow2Image ? image : undefined;
  s.out(`format name: ${image.format}\n`);
  s.out(`cluster size: ${cvtstr(qcow2 ? qcow2.header.clusterSize : 0)}\n`);
  s.out(`vm state offset: ${cvtstr(qcow2 ? vmStateOffset(qcow2) : 0)}\n`);
  if (qcow2) {
    const specific = (await info(image.path, { format: 'qcow2' }))['format-specific'];
    if (specific) {
      s.out('Format specific information:\n');
      s.out(dumpNested(specific.data as unknown as { [key: string]: QemuJsonValue }, 4).map((l) => `${l}\n`).join(''));
    }
  }
  return true;
}

/** `truncate [-m prealloc_mode] off`: qemu-io's truncate grows and shrinks, with qemu-img resize's checks. */
async function truncateCommand(s: IoSession, flags: Flags, operands: string[]): Promise<boolean> {
  const mode = flags.get('m')?.at(-1) ?? 'off';
  const size = parseNumber(operands[0]);
  if (!['off', 'metadata', 'falloc', 'full'].includes(mode)) {
    s.error(`Invalid preallocation mode '${mode}'`);
    return false;
  }
  const image = s.image instanceof ProbedRawImage ? s.image.inner : s.image!;
  try {
    if (size === 0) await truncateToZero(image);
    else await resizeImage(image, size, { shrink: true, preallocation: mode as Preallocation });
    return true;
  } catch (error) {
    s.error((error as Error).message);
    return false;
  }
}

/** An empty disk, which qemu-io allows and resizeImage (like qemu-img resize) does not. */
async function truncateToZero(image: Image): Promise<void> {
  if (image instanceof RawImage) await image.resize(0);
  else if (image instanceof Qcow2Image) await image.resize(0, { shrink: true, preallocation: 'off' });
  else throw new Qcow2Error(ErrorCodes.UNSUPPORTED, `truncate: images of format '${image.format}' cannot be resized`);
  await image.flush();
}

/** Options of `open -o`: only the format can be chosen (driver=raw|qcow2). */
function openFormat(s: IoSession, path: string, options: string[]): ImageFormat | undefined | false {
  let format: ImageFormat | undefined;
  for (const pair of options.flatMap((o) => o.split(','))) {
    const [key, value] = pair.split('=', 2);
    if (key === 'driver' && (value === 'raw' || value === 'qcow2')) {
      format = value;
      continue;
    }
    s.error(
      key === 'driver' ? `can't open device ${path}: Unknown driver '${value}'` : `can't open device ${path}: Block format does not support the option '${key}'`,
    );
    return false;
  }
  return format;
}

/** `open [-rsCnkU] [-t cache] [-d discard] [-o options] path`. */
async function openCommand(s: IoSession, flags: Flags, operands: string[]): Promise<boolean> {
  if (s.image) {
    s.error("file open already, try 'help close'");
    return false;
  }
  if (operands.length !== 1) throw new ShowUsage();
  const [path] = operands;
  const cacheText = flags.has('n') ? 'none' : (flags.get('t')?.at(-1) ?? IO_DEFAULT_CACHE);
  if (!(CACHE_MODES as readonly string[]).includes(cacheText)) {
    s.error(`Invalid cache option: ${cacheText}`);
    return false;
  }
  const format = openFormat(s, path, flags.get('o') ?? []);
  if (format === false) return false;
  return openInSession(s, { path, format, readOnly: flags.has('r'), cache: cacheText as CacheMode, snapshot: flags.has('s') });
}

/** Open an image into the session, printing qemu-io's "can't open device" on failure. */
export async function openInSession(s: IoSession, request: IoOpenRequest): Promise<boolean> {
  try {
    s.image = await s.opener(request);
    s.opened = request;
    return true;
  } catch (error) {
    s.error(`can't open device ${request.path}: ${(error as Error).message}`);
    return false;
  }
}

/** `sleep ms`: wait, letting asynchronous requests run meanwhile. */
async function sleepCommand(s: IoSession, _flags: Flags, operands: string[]): Promise<boolean> {
  const text = operands[0];
  if (!/^(0[xX][0-9a-fA-F]+|\d+)$/.test(text)) {
    s.out(`${text} is not a valid number\n`);
    return false;
  }
  await new Promise((resolve) => setTimeout(resolve, Number(text)));
  return true;
}

/** `reopen [(-r|-w)] [-c cache]`: the same image opened again with other access or cache; the old one stays on failure. */
async function reopenCommand(s: IoSession, flags: Flags, operands: string[]): Promise<boolean> {
  if (operands.length > 0) throw new ShowUsage();
  if (flags.has('r') && flags.has('w')) {
    s.error('Only one -r/-w option may be given');
    return false;
  }
  const cache = flags.get('c')?.at(-1);
  if (cache !== undefined && !(CACHE_MODES as readonly string[]).includes(cache)) {
    s.error(`Invalid cache option: ${cache}`);
    return false;
  }
  const option = flags.get('o')?.at(-1);
  if (option !== undefined) {
    s.error(`Cannot change the option '${option.split('=')[0]}'`);
    return false;
  }
  const old = s.image!;
  const previous = s.opened!;
  const readOnly = flags.has('r') ? true : flags.has('w') ? false : old.readOnly;
  await s.drain();
  await old.flush();
  const request = { ...previous, readOnly, cache: (cache as CacheMode | undefined) ?? previous.cache, again: true };
  try {
    s.image = await s.opener(request);
  } catch (error) {
    s.error((error as Error).message);
    return false;
  }
  s.opened = request;
  await old.close();
  return true;
}

async function closeCommand(s: IoSession): Promise<boolean> {
  await s.closeImage();
  return true;
}

/** `help [command]`. */
async function helpCommand(s: IoSession, _flags: Flags, operands: string[]): Promise<boolean> {
  if (operands.length === 0) {
    const sorted = [...COMMANDS].sort((a, b) => (a.name < b.name ? -1 : 1));
    s.out(sorted.map(usageLine).join('') + "\nUse 'help commandname' for extended help.\n");
    return true;
  }
  const command = find(operands[0]);
  if (!command) {
    s.out(`command ${operands[0]} not found\n`);
    return false;
  }
  s.out(usageLine(command) + (command.help ? `\n${command.help}` : ''));
  return true;
}

/** Refuse a format name other than raw and qcow2, as `-f` does. */
export function checkFormatName(text: string): ImageFormat {
  if (text !== 'raw' && text !== 'qcow2') throw new Qcow2Error(ErrorCodes.INVALID_ARGUMENT, `Unknown driver '${text}'`);
  return text;
}
