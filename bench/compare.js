#!/usr/bin/env node
'use strict';
/**
 * Time one of our commands against the equivalent qemu-img command, alternating them.
 *
 *   node bench/compare.js [--runs N] [--drop-caches] [--rm PATH]... [--json] -- "OURS" "THEIRS"
 *
 * A leading `qcow2` in a command means `node dist/ts/cli/main.js`. --rm deletes PATH before every
 * run (untimed), e.g. the output file of a convert. Prints both medians, peak RSS and the ratio.
 */
const fs = require('node:fs');

const { compareCommands } = require('./lib/compare.js');
const { hasGnuTime } = require('./lib/proc.js');
const { formatKiB, formatMs, formatRatio, printTable } = require('./lib/stats.js');

const USAGE = 'usage: node bench/compare.js [--runs N] [--drop-caches] [--rm PATH]... [--json] [--quiet] -- "OURS" "THEIRS"';

/** Parse the command line into options and the two commands. */
function parseCommandLine(argv) {
  const options = { runs: 5, dropCaches: false, remove: [], json: false, quiet: false };
  let i = 0;
  for (; i < argv.length && argv[i] !== '--'; i++) {
    const arg = argv[i];
    if (arg === '--runs') options.runs = positiveInteger(argv[++i], '--runs');
    else if (arg.startsWith('--runs=')) options.runs = positiveInteger(arg.slice(7), '--runs');
    else if (arg === '--drop-caches') options.dropCaches = true;
    else if (arg === '--rm') options.remove.push(required(argv[++i], '--rm'));
    else if (arg === '--json') options.json = true;
    else if (arg === '--quiet') options.quiet = true;
    else if (arg === '-h' || arg === '--help') return null;
    else break;
  }
  if (argv[i] === '--') i++;
  const commands = argv.slice(i);
  if (commands.length !== 2) throw new Error(`expected two commands after --, got ${commands.length}\n${USAGE}`);
  return { ...options, ours: commands[0], theirs: commands[1] };
}

function positiveInteger(text, flag) {
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n <= 0) throw new Error(`${flag} needs a positive integer, got '${text}'`);
  return n;
}

function required(text, flag) {
  if (text === undefined) throw new Error(`${flag} needs a value`);
  return text;
}

/** Print the comparison as a small table. */
function report(result, runs) {
  const row = (label, side) => [
    label,
    side.failed ? 'FAILED' : formatMs(side.medianMs),
    side.failed ? '-' : formatMs(side.medianCpuMs),
    side.failed ? '-' : formatKiB(side.maxRssKiB),
    `${side.wallMs.length}/${runs}`,
    side.command,
  ];
  printTable(['side', 'median wall', 'median CPU', 'peak RSS', 'runs ok', 'command'], [row('ours', result.ours), row('qemu-img', result.theirs)]);
  for (const [label, side] of [['ours', result.ours], ['qemu-img', result.theirs]]) {
    if (side.failed) process.stdout.write(`${label} failed: ${side.error}\n`);
  }
  process.stdout.write(`ratio ours/qemu-img (median wall time): ${formatRatio(result.ratio)}\n`);
  if (result.cachesDropped === false) process.stdout.write('note: dropping the page cache failed (not root?)\n');
  if (!hasGnuTime) process.stdout.write('note: /usr/bin/time missing, peak RSS polled from /proc (approximate)\n');
}

async function main() {
  let options;
  try {
    options = parseCommandLine(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(`${error.message}\n`);
    return 2;
  }
  if (!options) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const before = async () => {
    for (const file of options.remove) fs.rmSync(file, { force: true });
  };
  const log = options.quiet || options.json ? undefined : (line) => process.stderr.write(line + '\n');
  const result = await compareCommands(options.ours, options.theirs, { runs: options.runs, dropCaches: options.dropCaches, before, log });
  if (options.json) process.stdout.write(JSON.stringify(result, null, 2) + '\n');
  else report(result, options.runs);
  return result.ours.failed || result.theirs.failed ? 1 : 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    process.stderr.write(`${error.stack ?? error}\n`);
    process.exitCode = 1;
  },
);
