/** `qcow2 io [-f FMT] [-r] [-n] [-t CACHE] [-c CMD]... [-U] [IMG]`: a drop-in for qemu-io. */
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

import { Qcow2Error, asQcow2Error } from '../errors.js';
import type { Image, ImageFormat } from '../image.js';
import { CACHE_MODES, CacheMode } from '../native.js';
import { open, probeFormat } from '../open.js';
import { checkFormatName, executeLine, openInSession } from '../tools/io/commands.js';
import { create } from '../tools/create.js';
import { errorText } from '../tools/io/format.js';
import { ProbedRawImage, rawProbeWarning } from '../tools/io/probe-guard.js';
import { IO_DEFAULT_CACHE, IoOpenRequest, IoSession } from '../tools/io/session.js';
import { UsageError, lastOption, parseArgs } from './args.js';

const SPEC = {
  short: 'c:f:rsnCmki:t:d:T:UhV',
  long: {
    cmd: { value: true, key: 'c' },
    format: { value: true, key: 'f' },
    'read-only': { value: false, key: 'r' },
    snapshot: { value: false, key: 's' },
    nocache: { value: false, key: 'n' },
    'copy-on-read': { value: false, key: 'C' },
    misalign: { value: false, key: 'm' },
    'native-aio': { value: false, key: 'k' },
    aio: { value: true, key: 'i' },
    cache: { value: true, key: 't' },
    discard: { value: true, key: 'd' },
    trace: { value: true, key: 'T' },
    'force-share': { value: false, key: 'U' },
    help: { value: false, key: 'h' },
    version: { value: false, key: 'V' },
    'image-opts': { value: false },
    object: { value: true },
  },
};

const USAGE = `Usage: qcow2 io [OPTIONS]... [-c STRING]... [file]
Exercise the I/O path of an image, with qemu-io's commands and output.

  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     the image format (raw, qcow2); probed when left out
  -r, --read-only      open the image read-only
  -n, --nocache        disable host cache, short for -t none
  -t, --cache=MODE     host cache mode (none, writeback, unsafe, directsync, writethrough;
                       default writethrough)
  -U, --force-share    accepted for compatibility (no locks are taken)
  -C, -m, -k, -i MODE, -d MODE  accepted for compatibility
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See 'qcow2 io -c help' for information on available commands.
`;

/** Prefix of reported errors, where qemu-io writes "qemu-io: ". */
const PREFIX = 'qcow2: ';

const PROMPT = 'qemu-io> ';

/** qemu's wording for a file that could not be opened: "Could not open 'PATH': strerror". */
function openFailure(cause: Qcow2Error, imagePath: string): string {
  const node = /^E[A-Z0-9]+: .*, [a-z]+ '(.*)'$/.exec(cause.message);
  if (node) {
    const text = `Could not open '${node[1]}': ${errorText(cause)}`;
    // Any other file a Node call names is one the image points to: its backing file.
    return node[1] === imagePath ? text : `Could not open backing file: ${text}`;
  }
  if (/^E[A-Z0-9]+: /.test(cause.message)) return `Could not open '${imagePath}': ${errorText(cause)}`;
  return cause.message.replace(/^could not open/, 'Could not open');
}

/**
 * Snapshot mode, as qemu-io -s has it: a temporary qcow2 overlay over the image (made once, in the
 * temporary folder; the session deletes it at close) takes the writes; the image is only read.
 */
async function openOverlay(request: IoOpenRequest, format: ImageFormat): Promise<Image> {
  if (request.overlay === undefined) {
    const overlay = path.join(await mkdtemp(path.join(tmpdir(), 'qcow2-io-')), 'snapshot.qcow2');
    request.overlay = overlay;
    await create(overlay, { format: 'qcow2', backingFile: path.resolve(request.path), backingFormat: format });
  }
  return open(request.overlay, { format: 'qcow2', readOnly: request.readOnly, cache: request.cache, followFileNames: true });
}

/** Open images the way qemu-io does: backing and data file names followed, errors worded like qemu's. */
async function openForIo(request: IoOpenRequest) {
  let format: ImageFormat | undefined = request.format;
  try {
    // Read-only from the start, an overlay would change nothing: the image itself is opened.
    if (request.overlay !== undefined || (request.snapshot && !request.readOnly)) {
      return await openOverlay(request, format ?? (await probeFormat(request.path)));
    }
    const probedRaw = format === undefined && (format = await probeFormat(request.path)) === 'raw';
    // qemu warns only where writes are restricted: images opened writable.
    if (probedRaw && !request.again && !request.readOnly) process.stderr.write(rawProbeWarning(request.path));
    const image = await open(request.path, { format, readOnly: request.readOnly, cache: request.cache, followFileNames: true });
    return probedRaw ? new ProbedRawImage(image) : image;
  } catch (error) {
    throw new Error(openFailure(asQcow2Error(error), request.path));
  }
}

/** Run the -c commands in order until `quit`; true when every one succeeded. */
async function runCommands(session: IoSession, commands: string[]): Promise<boolean> {
  let ok = true;
  for (const line of commands) {
    const result = await executeLine(session, line);
    ok &&= result.ok;
    if (result.quit) break;
  }
  return ok;
}

/** The interactive loop: a prompt, a line from stdin, until EOF or `quit`; true when every command succeeded. */
async function runInteractive(session: IoSession): Promise<boolean> {
  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity, terminal: false });
  let ok = true;
  process.stdout.write(PROMPT);
  for await (const line of lines) {
    const result = await executeLine(session, line);
    ok &&= result.ok;
    if (result.quit) break;
    process.stdout.write(PROMPT);
  }
  lines.close();
  return ok;
}

/** Run `qcow2 io` with `argv` (the arguments after the subcommand); resolves to the exit code. */
export async function run(argv: string[]): Promise<number> {
  let args;
  try {
    args = parseArgs(argv, SPEC);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    process.stderr.write(`${PREFIX}${error.message}\n`);
    process.stdout.write(USAGE);
    return 1;
  }
  if (args.options.has('h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (args.options.has('V')) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { version } = require('../../../package.json') as { version: string };
    process.stdout.write(`qcow2 io version ${version}\n`);
    return 0;
  }
  const cache = args.options.has('n') ? 'none' : (lastOption(args, 't') ?? IO_DEFAULT_CACHE);
  if (!(CACHE_MODES as readonly string[]).includes(cache)) {
    process.stderr.write(`${PREFIX}Invalid cache option: ${cache}\n`);
    return 1;
  }
  if (args.positional.length > 1 || args.options.has('image-opts')) {
    if (args.positional.length <= 1) process.stderr.write(`${PREFIX}--image-opts is not supported\n`);
    process.stdout.write(USAGE);
    return 1;
  }
  const session = new IoSession(
    { out: (text) => process.stdout.write(text), err: (text) => process.stderr.write(text) },
    openForIo,
    PREFIX,
  );
  try {
    const [path] = args.positional;
    if (path !== undefined) {
      const formatText = lastOption(args, 'f');
      let format: ImageFormat | undefined;
      try {
        format = formatText === undefined ? undefined : checkFormatName(formatText);
      } catch (error) {
        session.error(`can't open device ${path}: ${(error as Error).message}`);
        return 1;
      }
      const opened = await openInSession(session, {
        path,
        format,
        readOnly: args.options.has('r'),
        cache: cache as CacheMode,
        snapshot: args.options.has('s'),
      });
      if (!opened) return 1;
    }
    const commands = args.options.get('c');
    const ok = commands ? await runCommands(session, commands) : await runInteractive(session);
    return ok ? 0 : 1;
  } finally {
    await session.closeImage();
  }
}
