#!/usr/bin/env node
/** The `qcow2` command: a drop-in for qemu-img (and `qcow2 io` for qemu-io). Dispatch only. */
/** A subcommand: gets its arguments (after the subcommand name) and returns the exit code. */
export type Command = (argv: string[]) => Promise<number>;

/**
 * Each subcommand lives in its own module, loaded only when it runs. `require`, not `import()`:
 * a dynamic import boots Node's ESM loader, a few milliseconds of every command's start-up.
 */
const COMMANDS: Record<string, () => { run: Command }> = {
  amend: () => require('./amend.js'),
  bench: () => require('./bench.js'),
  bitmap: () => require('./bitmap.js'),
  check: () => require('./check.js'),
  commit: () => require('./commit.js'),
  compare: () => require('./compare.js'),
  convert: () => require('./convert.js'),
  create: () => require('./create.js'),
  dd: () => require('./dd.js'),
  demo: () => require('./demo.js'),
  info: () => require('./info.js'),
  io: () => require('./io.js'),
  map: () => require('./map.js'),
  rebase: () => require('./rebase.js'),
  measure: () => require('./measure.js'),
  resize: () => require('./resize.js'),
  snapshot: () => require('./snapshot.js'),
};

function usage(): string {
  return [
    'usage: qcow2 [--version] [--help] COMMAND [ARGS...]',
    '',
    'A drop-in for qemu-img: the same subcommands, options, output and exit codes.',
    '',
    'Commands:',
    ...Object.keys(COMMANDS)
      .sort()
      .map((c) => `  ${c}`),
    '',
    "Run 'qcow2 COMMAND --help' for a command's options.",
  ].join('\n');
}

/** Print an error the way qemu-img does: "<prog>: <message>" on stderr. */
export function printError(error: unknown): void {
  const message = error instanceof Error ? error.message : String(error);
  process.stderr.write(`qcow2: ${message}\n`);
}

export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined) {
    process.stderr.write(`qcow2: Not enough arguments\nTry 'qcow2 --help' for more information\n`);
    return 1;
  }
  if (name === '--help' || name === '-h') {
    process.stdout.write(usage() + '\n');
    return 0;
  }
  if (name === '--version' || name === '-V') {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { version } = require('../../../package.json') as { version: string };
    process.stdout.write(`qcow2 version ${version}\n`);
    return 0;
  }
  const load = COMMANDS[name];
  if (!load) {
    process.stderr.write(`qcow2: Command not found: ${name}\n`);
    return 1;
  }
  try {
    return await load().run(rest);
  } catch (error) {
    printError(error);
    return 1;
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (error) => {
      printError(error);
      process.exitCode = 1;
    },
  );
}
